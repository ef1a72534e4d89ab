"""Every supported encoder family, as a tiny random model: export, torch-free training, exact logits, tokenizer.

Each model is built with transformers from a small config (hidden 32, 2 layers) and saved with the vocabulary
files its family's tokenizer is built from (no tokenizer.json), so export must build the real tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.support.torchfree import run_torchfree

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Federated fine-tuning of LoRA adapters on edge devices!",
    "Héllo WÖRLD — naïve café, 12,345.67 and CAPITALS",
    "  extra   spaces\tand\ttabs  ",
    "unknown glyphs: 北京 ☃ 🙂",
    "",
]
CORPUS = [f"the quick brown fox {i} jumps over the lazy dog {i * 7} times" for i in range(60)] + SAMPLE_TEXTS
SPM_SPECIALS = ["[CLS]", "[SEP]", "[MASK]"]
# family -> (transformers config class, config kwargs beyond the shared tiny sizes)
FAMILIES = {
    "bert": ("BertConfig", {}),
    "electra": ("ElectraConfig", {"embedding_size": 16}),
    "distilbert": ("DistilBertConfig", {}),
    "roberta": ("RobertaConfig", {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
    "xlm-roberta": ("XLMRobertaConfig", {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
    "camembert": ("CamembertConfig", {"pad_token_id": 1}),
    "albert": ("AlbertConfig", {"embedding_size": 16, "num_hidden_groups": 1}),
}
MAX_SEQ_LEN = 24
NUM_LABELS = 3


def _vocab_files(family: str, d: Path) -> int:
    """Write the family's vocabulary files (no tokenizer.json) into `d`; return the tokenizer's size."""
    if family in ("bert", "electra", "distilbert"):
        from fedhft.device_profiles.model_shape import packaged_model_dir

        shutil.copyfile(packaged_model_dir() / "vocab.txt", d / "vocab.txt")
        return 30522
    if family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False)
        bpe.save_model(str(d))
        return len(json.loads((d / "vocab.json").read_text()))
    import sentencepiece as spm

    name, kw = ("spiece", {"control_symbols": SPM_SPECIALS, "pad_id": 0, "unk_id": 1, "bos_id": -1, "eos_id": -1})
    if family in ("xlm-roberta", "camembert"):
        name, kw = ("sentencepiece.bpe", {})
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(d / name),
        vocab_size=150,
        hard_vocab_limit=False,
        minloglevel=2,
        model_type="unigram",
        **kw,
    )
    (d / f"{name}.vocab").unlink()
    size = spm.SentencePieceProcessor(model_file=str(d / f"{name}.model")).get_piece_size()
    return size if family == "albert" else size + 8  # XLM-R and CamemBERT add fairseq ids around the pieces


def make_family_model(family: str, d: Path, **overrides: object) -> Path:
    """A tiny random `family` encoder saved in `d` with its vocabulary files."""
    import torch
    import transformers

    d.mkdir(parents=True, exist_ok=True)
    vocab = _vocab_files(family, d)
    cls_name, kw = FAMILIES[family]
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    if family == "distilbert":
        sizes = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}
    positions = 40 if family in ("roberta", "xlm-roberta", "camembert") else 32
    config = getattr(transformers, cls_name)(
        vocab_size=vocab, max_position_embeddings=positions, **sizes, **{**kw, **overrides}
    )
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_family_model(family, root / family) for family in FAMILIES}


def _export(model_dir: Path, profile_path: Path, out: Path) -> Path:
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export.pipeline import ExportOptions, export_profile

    opts = ExportOptions(num_labels=NUM_LABELS, max_seq_len=MAX_SEQ_LEN, min_compression=None)
    return export_profile(model_dir, load_profile(profile_path), out, opts=opts).directory


def _int8_rounded_logits(model_dir: Path, ids: np.ndarray, mask: np.ndarray, head: dict[str, np.ndarray]) -> np.ndarray:
    """transformers' own forward with every linear weight and the word embedding rounded to int8 per row, then
    fedhft's mean pooling and head: what the exported graph must compute while the adapters are still zero."""
    import torch
    from transformers import AutoModel

    from fedhft.export.layers import quantize_rows

    enc = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        weights = [m.weight for m in enc.modules() if isinstance(m, torch.nn.Linear)]
        for w in [*weights, enc.embeddings.word_embeddings.weight]:
            q, scale = quantize_rows(w)
            w.copy_(q.float() * scale[:, None])
        m = torch.from_numpy(mask)
        hidden = enc(input_ids=torch.from_numpy(ids), attention_mask=m).last_hidden_state
        mf = m.unsqueeze(-1).float()
        pooled = (hidden * mf).sum(1) / mf.sum(1).clamp_min(1.0)
        return (pooled @ torch.from_numpy(head["head.weight"]).T + torch.from_numpy(head["head.bias"])).numpy()


TRAIN = """
import json, sys, numpy as np
from fedhft.edge_runtime.ort_backend import OrtTrainer
from fedhft.edge_runtime.tokenize import TextEncoder
t = OrtTrainer({dir!r}, learning_rate=5e-3)
ids, mask = TextEncoder.for_manifest(t.manifest, {dir!r}).encode({texts!r})
y = np.arange(len(ids)) % {labels}
losses = [t.train_step(ids, mask, y).loss for _ in range(30)]
print(json.dumps({{"losses": losses, "torch": "torch" in sys.modules, "ids": ids.tolist(), "mask": mask.tolist()}}))
"""


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_trains_torch_free_and_matches_transformers(
    family: str, family_dirs: dict[str, Path], tiny_profile_path: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from fedhft.edge_runtime.ort_backend import OrtTrainer
    from fedhft.protocol.manifest import load_manifest

    model_dir = family_dirs[family]
    profile_dir = _export(model_dir, tiny_profile_path, tmp_path)
    manifest = load_manifest(profile_dir)
    assert manifest.plan["layers"], "some layer is adapted"

    texts = [*SAMPLE_TEXTS, "a dog", "LoRA on phones and laptops"]
    res = run_torchfree(TRAIN.format(dir=str(profile_dir), texts=texts, labels=NUM_LABELS))
    assert res["torch"] is False
    assert min(res["losses"][-10:]) < 0.5 * res["losses"][0], res["losses"]
    # The device encodes exactly as transformers' tokenizer of the model directory does.
    ref = AutoTokenizer.from_pretrained(model_dir)(texts, truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]
    assert [row[: len(r)] for row, r in zip(res["ids"], ref, strict=True)] == ref

    trainer = OrtTrainer(profile_dir)
    ids, mask = np.array(res["ids"], dtype=np.int64), np.array(res["mask"], dtype=np.int64)
    logits = trainer.eval_step(ids, mask, np.zeros(len(ids), np.int64)).logits
    expected = _int8_rounded_logits(model_dir, ids, mask, trainer.get_parameters())
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)
    assert manifest.max_seq_len == MAX_SEQ_LEN


@pytest.mark.parametrize("family", ["albert", "roberta"])
def test_plan_and_export_agree_on_runtime_and_estimates(
    family: str, family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from fedhft.cli import main
    from fedhft.device_profiles.profile import load_profile
    from fedhft.export.pipeline import ExportOptions, export_profile
    from fedhft.protocol.manifest import load_manifest

    profile = "phone-midrange-6gb"  # runs ORT and ExecuTorch, defaults to ExecuTorch: export plans for ORT
    args = ["plan", "--model", str(family_dirs[family]), "--profile", profile, "--json", "--min-compression", "0"]
    r = CliRunner().invoke(main, [*args, "--num-labels", str(NUM_LABELS), "--max-seq-len", str(MAX_SEQ_LEN)])
    assert r.exit_code == 0, r.output
    opts = ExportOptions(num_labels=NUM_LABELS, max_seq_len=MAX_SEQ_LEN, min_compression=None)
    res = export_profile(family_dirs[family], load_profile(profile), tmp_path, opts=opts)
    planned = json.loads(r.output)
    assert planned["runtime"] == "ort"
    assert load_manifest(res.directory).plan == planned


def test_sharded_checkpoint_exports_and_hashes_every_shard(tmp_path: Path, tiny_profile_path: Path) -> None:
    import hashlib

    import torch
    from transformers import BertConfig, BertModel

    from fedhft.device_profiles.model_shape import packaged_model_dir
    from fedhft.protocol.manifest import load_manifest

    d = tmp_path / "sharded"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    BertModel(cfg).save_pretrained(d, max_shard_size="1MB")
    shutil.copyfile(packaged_model_dir() / "vocab.txt", d / "vocab.txt")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    profile_dir = _export(d, tiny_profile_path, tmp_path / "out")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in shards)).hexdigest()
    assert load_manifest(profile_dir).base_model_sha256 == digest


def test_wordpiece_tokenizer_follows_tokenizer_config_and_matches_the_slow_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from fedhft.device_profiles.model_shape import packaged_model_dir, read_model
    from fedhft.export.tokenizer import write_tokenizer

    vocab = packaged_model_dir() / "vocab.txt"
    for lower in (True, False):
        d = tmp_path / f"lower-{lower}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "bert", **_TINY_BERT}))
        (d / "model.safetensors").write_text("")
        (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
        shutil.copyfile(vocab, d / "vocab.txt")
        out = tmp_path / f"out-{lower}"
        out.mkdir()
        built = Tokenizer.from_file(str(out / write_tokenizer(read_model(d), out)))
        slow = BertTokenizerLegacy(vocab_file=str(vocab), do_lower_case=lower)
        for text in SAMPLE_TEXTS:
            assert built.encode(text).ids == slow(text)["input_ids"], text


_TINY_BERT = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}


def test_a_shared_frozen_linear_gets_one_transposed_copy() -> None:
    import torch

    from fedhft.export.executorch_export import transpose_frozen_linears
    from fedhft.export.layers import FrozenLinear

    shared = FrozenLinear(torch.nn.Linear(8, 4), int8=True)
    holder = torch.nn.ModuleList([torch.nn.Sequential(shared), torch.nn.Sequential(shared)])
    assert transpose_frozen_linears(holder) == 1
    assert holder[0][0] is holder[1][0]
