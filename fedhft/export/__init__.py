"""Export toolchain (workstation, needs torch): masked-LoRA int8 models to on-device training artifacts."""
