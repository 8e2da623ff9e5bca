"""Math core: pure functions on tensors and arrays. No Ray and no storage are imported here."""
