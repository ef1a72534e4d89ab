"""Export toolchain (workstation, needs torch): masked-LoRA int8 models to on-device training artifacts."""

import logging as _logging

# transformers imports torchao, whose import logs warnings about torch internals and optional kernels that do not
# concern an export; keep them out of our quiet-by-default output (errors still show).
for _name in ("torch.utils._pytree", "torchao", "torchao.kernel.intmm"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
