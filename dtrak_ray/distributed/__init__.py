"""Every Ray call of dtrak-ray lives in this subpackage, so a Ray upgrade touches one place."""
