"""Pipeline stages. Each reads its inputs from the store and writes its outputs there, then marks
them complete; Ray is reached only through ``dtrak_ray.distributed``."""
