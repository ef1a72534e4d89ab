#!/usr/bin/env bash
# Cross-compile the native ExecuTorch trainer for aarch64 (Raspberry Pi OS 64-bit, phones' Linux) against
# the aarch64 executorch wheel, then run training steps under qemu-user and compare them with the x86_64
# build on the same program.
#
#   bench/aarch64_native.sh [WORK_DIR]        (default WORK_DIR: /tmp/fedhft-aarch64)
#
# Needs: Debian/Ubuntu's cross toolchain and user-mode qemu
#   sudo apt-get install g++-aarch64-linux-gnu qemu-user-static cmake ninja-build
# and this repo's venv (.venv, with torch for the tiny export and the executorch wheel for the x86 build).
# Steps: 1) + 2) scripts/aarch64-trainer WORK: the manylinux_2_28_aarch64 executorch==1.5.1 wheel unpacked
# and the trainer cross-built against it (cmake, aarch64 toolchain file); 3) export a
# tiny random BERT (.pte programs are architecture-independent); 4) drive the aarch64 binary through the
# normal Python wrapper (NativeTrainer) with a qemu-aarch64 launcher, 3 steps; same with the x86 binary.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/fedhft-aarch64}
PY=${PY:-$ROOT/.venv/bin/python}
SYSROOT=/usr/aarch64-linux-gnu
mkdir -p "$WORK"

QEMU=$(command -v qemu-aarch64 || command -v qemu-aarch64-static) || {
  echo "missing qemu-aarch64: apt-get install qemu-user-static (or qemu-user)" >&2
  exit 1
}

# 1) + 2) the aarch64 executorch wheel and the cross build (scripts/aarch64-trainer)
BIN=$(PY="$PY" "$ROOT/scripts/aarch64-trainer" "$WORK")
ET_AARCH64="$WORK/wheel/executorch"

# the launcher NativeTrainer starts: qemu with the cross sysroot and the wheel's aarch64 libraries
cat > "$WORK/trainer-qemu" <<EOF
#!/bin/sh
exec $QEMU -L $SYSROOT -E LD_LIBRARY_PATH=$ET_AARCH64/lib "$BIN" "\$@"
EOF
chmod +x "$WORK/trainer-qemu"

# 3) + 4) a tiny export, then 3 training steps on aarch64 (qemu) and on the x86 build
cd "$ROOT"
"$PY" - "$WORK" <<'PYEOF'
import json, shutil, sys, time
from pathlib import Path

import numpy as np

work = Path(sys.argv[1])
prof = work / "export" / "tiny"
if not (prof / "executorch" / "program.json").is_file():
    import torch
    from transformers import BertConfig, BertModel

    from fedhft.device_profiles.model_shape import packaged_model_dir, read_model
    from fedhft.device_profiles.planner import uniform_plan
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export import pipeline
    from fedhft.export.executorch_export import export_executorch_for_profile

    torch.manual_seed(0)
    mdir = work / "tiny-bert"
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(mdir)
    for f in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(packaged_model_dir() / f, mdir / f)
    profile = load_profile("rpi4-4gb")
    plan = uniform_plan(read_model(mdir).shape(3, 32, 8), profile, rank=4, depth=1,
                        targets=("query", "value"), int8=True)
    formats = tuple(f for f in ("ort", "executorch") if f in pipeline.FORMATS)
    res = pipeline.export_profile(mdir, profile, work / "export", formats=formats, plan=plan, name="tiny",
                                  opts=pipeline.ExportOptions(num_labels=3, max_seq_len=32, int8=True))
    if "executorch" not in formats:
        export_executorch_for_profile(res.directory, mdir)

from fedhft.edge_runtime.native_backend import DEFAULT_BUILD_DIR, NativeTrainer, build_native

x86 = DEFAULT_BUILD_DIR / "fedhft-et-trainer"
if not x86.is_file():
    x86 = build_native()
rng = np.random.default_rng(0)
ids = rng.integers(1000, 5000, size=(4, 16)); mask = np.ones_like(ids); y = np.arange(4) % 3
out = {}
for name, binary in (("aarch64_qemu", work / "trainer-qemu"), ("x86_64", x86)):
    t0 = time.perf_counter()
    with NativeTrainer(prof, learning_rate=1e-2, binary=binary, timeout=900) as t:
        load = time.perf_counter() - t0
        steps = []
        for _ in range(3):
            t1 = time.perf_counter()
            steps.append((t.train_step(ids, mask, y).loss, time.perf_counter() - t1))
    out[name] = {"losses": [round(l, 6) for l, _ in steps], "step_s": [round(s, 3) for _, s in steps],
                 "load_s": round(load, 2)}
a, b = out["aarch64_qemu"]["losses"], out["x86_64"]["losses"]
out["max_rel_loss_diff"] = float(max(abs(p - q) / abs(q) for p, q in zip(a, b)))
out["ok"] = out["max_rel_loss_diff"] < 1e-3 and a[-1] < a[0]
print(json.dumps(out, indent=2))
sys.exit(0 if out["ok"] else 1)
PYEOF
