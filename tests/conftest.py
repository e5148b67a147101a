"""Test-wide JAX settings: strict dtype promotion (silent upcasts fail) and 8 CPU devices."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
if jax.default_backend() == "cpu":
    try:
        jax.config.update("jax_num_cpu_devices", 8)
    except RuntimeError:  # backend already initialised by another plugin; XLA_FLAGS covers it
        pass
