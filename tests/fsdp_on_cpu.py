"""Run a script under accelerate's FSDP on CPU processes (gloo), for the tests: `accelerate launch
--config_file configs/accelerate/fsdp.yaml ... tests/fsdp_on_cpu.py train_x.py --flag ...`.

accelerate 1.15 builds its FSDP plugin from the config on any machine but selects FSDP only on GPUs:
on CPU it sets up plain multi-CPU data parallelism (which utils/loop.make_accelerator refuses, since
no weight would be sharded). torch's FSDP2 itself runs on CPU over gloo, so this wrapper selects it
where accelerate would not, then runs the script as `python script.py` would. Nothing in the recipes
knows about it: on GPUs the same config runs the same code without the wrapper.
"""

from __future__ import annotations

import os
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_with_fsdp(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = plugin
        self.distributed_type = DistributedType.FSDP
        # later AcceleratorState() calls copy the process-level state over theirs: keep FSDP there too
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)


if __name__ == "__main__":
    state.AcceleratorState.__init__ = _init_with_fsdp
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
