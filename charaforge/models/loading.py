"""The one lock every load that builds torch modules from weight files takes.

diffusers' `from_pretrained` and `load_lora_weights` build modules under accelerate's and peft's
`init_empty_weights`, which replace `torch.nn.Module.register_parameter` for the whole process
while they run and put back the function they found on entry. Two threads inside at once can
put back each other's replacement: from then on every module the process builds, in any thread,
gets its parameters on the meta device (seen in CI: the two-engine sweep left a test worker
unable to build a UNet). Engines on several devices and the server's workers load in threads,
so every such load holds this lock; rendering does not.
"""

from __future__ import annotations

import threading

# Re-entrant: a pipeline load may load its IP-Adapter or ControlNets inside.
WEIGHTS_LOADING_LOCK = threading.RLock()
