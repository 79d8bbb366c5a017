"""Launch target for `accelerate launch` in tests: `stablemdm.cli` with accelerate's FSDP
allowed on CPU processes.

accelerate enables FSDP only for GPU-like distributed types; on CPU processes it silently
trains with DDP instead. This shim, used only by tests/test_distributed.py, turns
ACCELERATE_USE_FSDP (set by `accelerate launch --config_file configs/accelerate/fsdp.yaml`)
into FSDP on MULTI_CPU too, so that the same FSDP2 code runs on gloo: `fully_shard` of the
model, sharded (DTensor) gradients and their norm, the FULL_STATE_DICT gathered on save, and
the sharded optimizer checkpoint on save and resume.
"""

import os
import sys

import accelerate.state as state
from accelerate.utils import FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp and self.distributed_type == state.DistributedType.MULTI_CPU:
        plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
        self.distributed_type = state.DistributedType.FSDP
        self.fsdp_plugin = plugin or FullyShardedDataParallelPlugin()


state.AcceleratorState.__init__ = _init_fsdp_on_cpu

from stablemdm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
