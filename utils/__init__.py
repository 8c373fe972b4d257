"""Shared pieces of the distillation recipes: solvers, scalings, losses, loading, data, toy world."""

import logging

# bitsandbytes (used only for 8-bit Adam on CUDA) warns at import on CPUs with AVX512-BF16 that an
# optional kernel hub package is missing; that kernel is for 4-bit inference, which we never use.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
