"""GPU worker: resident diffusers pipelines behind an in-process RQ worker.

Never imports the Discord gateway client; results go out over Discord's REST webhooks.
"""

import logging

# diffusers imports torchao (worker.quantize) with its pipelines. On a host without the CUDA
# kernels torchao ships for other builds (every CPU host, older CUDA) that import logs warnings
# on every start, before any command has run: noise in every log and in the one-line errors of
# the CLI. What torchao cannot do is reported where quantization is asked for (worker.quantize).
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao"):
    logging.getLogger(_name).setLevel(logging.ERROR)
