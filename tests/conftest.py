import os

# Tests run on the CPU; a developer's GPU is not needed and would change float results slightly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
