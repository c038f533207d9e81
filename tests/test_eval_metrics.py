"""FID / KID against closed forms, top-k accuracy, and the judge on the committed fixture."""

from pathlib import Path

import pytest
import torch

from dreamlab.eval.metrics import fid, kid, topk_accuracy


def test_fid_of_gaussians_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    d, n = 8, 200_000
    a = torch.randn(n, d, generator=g)
    b = torch.randn(n, d, generator=g) * 2 + 1  # N(1, 4 I)
    # ||mu||^2 + tr(I + 4I - 2 * 2I) = d + d
    assert fid(a, b) == pytest.approx(2 * d, rel=0.02)
    assert fid(a, a) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="FID needs at least 2 feature vectors in each set, got 1 and 200000"):
        fid(a[:1], b)
    with pytest.raises(ValueError, match="KID needs"):
        kid(a, b[:1])


def test_kid_is_near_zero_for_one_distribution_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    same, _ = kid(a, b, subsets=20, subset_size=500)
    diff, _ = kid(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 0.01 < diff


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    acc = topk_accuracy(logits, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(2 / 3)


FIXTURE = Path(__file__).parent / "fixtures" / "emoji"


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from dreamlab.eval.judge import JudgeConfig, train_judge

    return train_judge(JudgeConfig(data=str(FIXTURE), out=str(tmp_path_factory.mktemp("judge")), epochs=1, batch_size=16))


def test_judge_trains_and_round_trips(judge_dir):
    from dreamlab.eval.judge import judge_outputs, load_judge

    judge, bases, labels = load_judge(judge_dir)
    feats, logits = judge_outputs(judge, torch.zeros(3, 4, 64, 64))
    assert feats.shape == (3, 256) and logits.shape == (3, len(bases)) and len(labels) == len(bases)


def test_eval_of_a_model_and_of_every_snapshot_of_a_run(tmp_path, tiny_dir, judge_dir, capsys, monkeypatch):
    import json
    import shutil

    from dreamlab.cli import main

    common = ["--data", str(FIXTURE), "--judge", str(judge_dir), "--prompts", "2", "--per-prompt", "2", "--steps", "2"]
    assert main(["eval", "--model", str(tiny_dir), "--json", str(tmp_path / "eval.json"), *common]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n_generated"] == 4 and result["n_real_held_out"] == 5
    assert 0 <= result["model"]["top1"] <= result["model"]["top5"] <= 1
    assert "held-out real (ceiling)" in capsys.readouterr().out

    run = tmp_path / "run"
    for step, hours in ((100, 0.5), (200, 1.25)):
        snap = shutil.copytree(tiny_dir, run / "snapshots" / f"step-{step:07d}")
        spec = json.loads((snap / "dreamlab.json").read_text())
        (snap / "dreamlab.json").write_text(json.dumps({**spec, "training": {"steps": step, "train_hours": hours}}))
    assert main(["eval", "--run", str(run), *common]) == 0
    curve = json.loads((run / "curve.json").read_text())
    assert [(p["steps"], p["train_hours"]) for p in curve] == [(100, 0.5), (200, 1.25)]
    assert curve[0]["ceiling_top5"] == curve[1]["ceiling_top5"] == result["real_held_out"]["top5"]
    assert (run / "curve.png").stat().st_size > 0

    # Run again after a new snapshot: only the new one is scored; the others come from curve.json.
    from dreamlab.eval import evaluate as ev_mod

    scored = []
    real_score = ev_mod._Evaluator.score
    monkeypatch.setattr(ev_mod._Evaluator, "score", lambda self, snap: scored.append(snap.name) or real_score(self, snap))
    snap = shutil.copytree(tiny_dir, run / "snapshots" / "step-0000300")
    spec = json.loads((snap / "dreamlab.json").read_text())
    (snap / "dreamlab.json").write_text(json.dumps({**spec, "training": {"steps": 300, "train_hours": 2.0}}))
    assert main(["eval", "--run", str(run), *common]) == 0
    assert scored == ["step-0000300"]
    assert [p["steps"] for p in json.loads((run / "curve.json").read_text())] == [100, 200, 300]
    # Different settings measure differently: everything is scored again.
    scored.clear()
    assert main(["eval", "--run", str(run), *common[:-1], "3"]) == 0
    assert len(scored) == 3


def test_eval_of_cascades_counts_both_stages_compute(tmp_path, judge_dir):
    """A 32x32 base alone, the base with an SR stage, and a cascade folder: all judged at 64x64, with
    the compute of every stage counted (the base-vs-cascade comparison of docs/training.md)."""
    import json
    import shutil

    from dreamlab.cli import main
    from dreamlab.models.tiny import make_tiny_cascade

    cascade = make_tiny_cascade(tmp_path / "cascade")
    for stage, hours in (("base", 0.5), ("sr", 0.25)):
        spec = json.loads((cascade / stage / "dreamlab.json").read_text())
        (cascade / stage / "dreamlab.json").write_text(json.dumps({**spec, "training": {"steps": 10, "train_hours": hours}}))
    common = ["--data", str(FIXTURE), "--judge", str(judge_dir), "--prompts", "2", "--per-prompt", "1", "--steps", "2"]
    assert main(["eval", "--model", str(cascade), "--json", str(tmp_path / "c.json"), *common]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["training"]["train_hours"] == 0.75 and result["training"]["super_resolution"]["train_hours"] == 0.25
    assert result["n_generated"] == 2

    run = tmp_path / "run"
    shutil.copytree(cascade / "base", run / "snapshots" / "step-0000010")
    assert main(["eval", "--run", str(run), "--upscaler", str(cascade / "sr"), *common]) == 0
    assert main(["eval", "--run", str(run), *common]) == 0  # the base alone, enlarged bicubically
    with_sr = json.loads((run / "curve-cascade.json").read_text())
    alone = json.loads((run / "curve.json").read_text())
    assert with_sr[0]["train_hours"] == 0.75 and alone[0]["train_hours"] == 0.5
    assert (run / "curve-cascade.png").exists() and (run / "curve.png").exists()
    assert main(["eval", "--model", str(cascade / "base"), "--upscaler", str(cascade / "base"), *common]) == 2


def test_eval_of_a_run_without_snapshots_says_so(tmp_path, judge_dir, capsys):
    from dreamlab.cli import main

    assert main(["eval", "--run", str(tmp_path), "--data", str(FIXTURE), "--judge", str(judge_dir)]) == 2
    assert "no snapshots" in capsys.readouterr().err


def test_ship_installs_model_and_judge_in_fp16_with_checksums(tmp_path, tiny_dir, judge_dir):
    from safetensors.torch import load_file

    from dreamlab.cli import main
    from dreamlab.eval.judge import load_judge
    from dreamlab.loading.files import sha256_file
    from dreamlab.loading.model import load_model

    dest = tmp_path / "weights"
    assert main(["ship", "--model", str(tiny_dir), "--judge", str(judge_dir), "--dest", str(dest)]) == 0
    lines = (dest / "SHA256SUMS").read_text().splitlines()
    listed = {rel: digest for digest, rel in (line.split("  ") for line in lines)}
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == on_disk and all(sha256_file(dest / rel) == h for rel, h in listed.items())
    assert "default/unet/diffusion_pytorch_model.safetensors" in listed and "judge/judge.safetensors" in listed
    for f in (dest / "default").rglob("*.safetensors"):
        assert {v.dtype for v in load_file(str(f)).values() if v.is_floating_point()} == {torch.float16}
    # Loaded back in float32, the shipped model gives the source model's image up to fp16 rounding.
    from dreamlab.generate import generate, make_request

    req = make_request(prompt="red apple", seed=0, steps=3)
    a, b = generate(load_model(tiny_dir), req).pixels, generate(load_model(dest / "default"), req).pixels
    assert (a - b).abs().max() < 0.05
    judge, bases, _ = load_judge(dest / "judge")
    assert next(judge.parameters()).dtype == torch.float32 and len(bases) > 0
    # Shipping again replaces, never mixes, the previous weights.
    assert main(["ship", "--model", str(tiny_dir), "--judge", str(judge_dir), "--dest", str(dest)]) == 0
    assert (dest / "SHA256SUMS").read_text().splitlines() == lines


def test_ship_refuses_a_folder_that_is_not_a_model(tmp_path, judge_dir, capsys):
    from dreamlab.cli import main

    assert main(["ship", "--model", str(tmp_path), "--judge", str(judge_dir), "--dest", str(tmp_path / "w")]) == 2
    assert "not a dreamlab model folder" in capsys.readouterr().err
    (tmp_path / "dreamlab.json").write_text('{"cascade": ')  # corrupt: named, not a JSON traceback
    assert main(["ship", "--model", str(tmp_path), "--judge", str(judge_dir), "--dest", str(tmp_path / "w")]) == 2
    assert "dreamlab.json is invalid" in capsys.readouterr().err


def test_eval_on_training_prompts_measures_the_generalisation_gap(tmp_path, tiny_dir, judge_dir, capsys):
    """--prompts-from train: renderings the model was trained on, spread over the set; unknown values named."""
    import json

    from dreamlab.cli import main
    from dreamlab.data.dataset import EmojiDataset
    from dreamlab.eval.evaluate import training_prompts

    train = EmojiDataset(FIXTURE, split="train")
    picks = training_prompts(train, 6)
    assert picks == training_prompts(train, 6) and len(picks) == 6
    assert all(r["skin_tone"] is None for r in picks)
    assert len({(r["base"], r["style"]) for r in picks}) == 6
    held_out = {(r["base"], r["style"]) for r in EmojiDataset(FIXTURE, split="test").records}
    assert not held_out & {(r["base"], r["style"]) for r in picks}
    assert picks != [r for r in train.records if r["skin_tone"] is None][:6]  # not just the first ones

    common = ["--data", str(FIXTURE), "--judge", str(judge_dir), "--prompts", "2", "--per-prompt", "1", "--steps", "2"]
    assert main(["eval", "--model", str(tiny_dir), "--prompts-from", "train", "--json", str(tmp_path / "e.json"), *common]) == 0
    assert "model (training prompts)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["prompts_from"] == "train"
    assert main(["eval", "--model", str(tiny_dir), "--prompts-from", "seen", *common]) == 2
    assert "--prompts-from 'seen'" in capsys.readouterr().err


def test_eval_prompts_skip_scores_the_prompts_after_the_scored_ones(tmp_path, tiny_dir, judge_dir, capsys):
    """--prompts-skip N: the held-out prompts after the first N (a validation set for sampling settings),
    in the same fixed order; a skip past the end, or a negative one, is named."""
    import json

    from dreamlab.cli import main
    from dreamlab.data.dataset import EmojiDataset
    from dreamlab.eval.evaluate import EvalConfig, curve_file, held_out_prompts

    test = EmojiDataset(FIXTURE, split="test")
    every = held_out_prompts(test, 10**9)
    assert held_out_prompts(test, 3 + 2)[3:] == every[3:5]
    common = ["--data", str(FIXTURE), "--judge", str(judge_dir), "--per-prompt", "1", "--steps", "2"]
    assert main(["eval", "--model", str(tiny_dir), "--prompts", "2", "--prompts-skip", "1",
                 "--json", str(tmp_path / "e.json"), *common]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["settings"]["prompts_skip"] == 1 and result["n_generated"] == 2
    assert curve_file(EvalConfig(prompts_skip=1), tmp_path).name == "curve-skip1.json"
    assert curve_file(EvalConfig(), tmp_path).name == "curve.json"
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_dir), "--prompts-skip", str(len(every)), *common]) == 2
    assert f"leaves no prompts: the test split gives {len(every)}" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--prompts-skip", "-1", *common]) == 2
    assert "no negative skip" in capsys.readouterr().err


def test_eval_prompt_format_asks_each_rendering_another_way(tmp_path, tiny_dir, judge_dir, capsys):
    """--prompt-format: the same renderings asked by label alone, in the other style, or composed; an
    unknown field is named before anything loads."""
    import json

    from dreamlab.cli import main
    from dreamlab.eval.evaluate import EvalConfig, curve_file, prompt_for

    r = {"label": "waving hand", "style": "twitter", "skin_tone": "medium"}
    assert prompt_for(r) == "waving hand, medium skin tone, twitter style"
    assert prompt_for(r, "{label}") == "waving hand, medium skin tone"
    assert prompt_for(r, "{label}, {other_style}") == "waving hand, medium skin tone, google style"
    assert prompt_for(r, "{label} AND {style} :0.5") == "waving hand, medium skin tone AND twitter style :0.5"
    common = ["--data", str(FIXTURE), "--judge", str(judge_dir), "--prompts", "2", "--per-prompt", "1", "--steps", "2"]
    assert main(["eval", "--model", str(tiny_dir), "--prompt-format", "{label} AND {style}", "--json", str(tmp_path / "e.json"), *common]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["prompt_format"] == "{label} AND {style}"
    assert curve_file(EvalConfig(prompt_format="{label}"), tmp_path).name.startswith("curve-prompts-")
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_dir), "--prompt-format", "{name}", *common]) == 2
    assert "--prompt-format '{name}': 'name' is not a field; use {caption}, {label}, {style}, {other_style}" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), *common, "--prompts", "1"]) == 2  # FID of one image: named, not a LinAlgError
    assert "FID and KID need at least 2 generated images; 1 prompt(s) x --per-prompt 1 gives 1" in capsys.readouterr().err


def test_ship_as_a_named_model_installs_it_beside_the_default_and_rewrites_all_checksums(tmp_path, tiny_dir, judge_dir, capsys):
    from safetensors.torch import load_file

    from dreamlab.cli import main
    from dreamlab.loading.files import sha256_file

    dest = tmp_path / "weights"
    assert main(["ship", "--model", str(tiny_dir), "--judge", str(judge_dir), "--dest", str(dest)]) == 0
    card = tmp_path / "card.md"
    card.write_text("# a student\n")
    assert main(["ship", "--model", str(tiny_dir), "--as", "fast", "--card", str(card), "--dest", str(dest)]) == 0
    listed = {rel: h for h, rel in (line.split("  ") for line in (dest / "SHA256SUMS").read_text().splitlines())}
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == on_disk and all(sha256_file(dest / rel) == h for rel, h in listed.items())
    assert "default/dreamlab.json" in listed and "fast/MODEL_CARD.md" in listed  # both, not the last one alone
    assert (dest / "fast" / "MODEL_CARD.md").read_text() == "# a student\n"
    for f in (dest / "fast").rglob("*.safetensors"):
        assert {v.dtype for v in load_file(str(f)).values() if v.is_floating_point()} == {torch.float16}
    # the default is not a name --as installs, and --judge belongs to the default model: one line each
    for argv, msg in ((["--as", "default"], "--as 'default'"), (["--as", "fast", "--judge", str(judge_dir)], "--judge ships"),
                      ([], "--judge is needed"), (["--as", "fast", "--card", str(tmp_path / "no.md")], "no such file")):
        assert main(["ship", "--model", str(tiny_dir), "--dest", str(dest), *argv]) == 2
        assert msg in capsys.readouterr().err
    assert set(listed) == {rel for _, rel in (line.split("  ") for line in (dest / "SHA256SUMS").read_text().splitlines())}
