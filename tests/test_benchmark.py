"""``kangaroo bench`` end to end on a tiny random model, and its metrics recomputed from answer files alone.

The tiny model uses the tiny in-process chat tokenizer of conftest.py (no download).
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest
import torch

from kangaroo.bench import metrics
from kangaroo.bench.methods import METHODS, _HFGenerate
from kangaroo.bench.questions import load_questions, task_of
from kangaroo.cli import main
from kangaroo.config import KangarooConfig
from kangaroo.kernels import kernel_available
from kangaroo.errors import KangarooError
LOOKUP = KangarooConfig().lookup_tokens  # the default prompt-lookup draft length
ALL_METHODS = "ar-hf,ar-hf-static,ar-eager,ar,kangaroo,kangaroo-chain,kangaroo-tree,kangaroo+pld,kangaroo-full-vocab,kangaroo-fixed,lookup,early-exit,pld"
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short poem about the sea.", "Now make it rhyme."]},
    {"question_id": 82, "category": "coding", "turns": ["Write a Python function that adds two numbers.", "Add type hints."]},
    {"question_id": 161, "category": "translation", "turns": ["Translate German to English: Guten Morgen, wie geht es dir?"]},
    {"question_id": 162, "category": "translation", "turns": ["Translate German to English: Das Wetter ist heute schön."]},
    {"question_id": 241, "category": "math_reasoning", "turns": ["Tom has 3 apples and buys 4 more. How many apples does he have?"]},
    {"question_id": 321, "category": "rag", "turns": ["Context: the sea is salty. The sea is salty because of the salt. Question: why is the sea salty?"]},
]


@pytest.fixture(scope="module")
def question_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("questions") / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, question_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    torch.set_num_threads(1)
    rc = main(["bench", "--model", str(tiny_model_dir), "--adapter", "random", "--threads", "1",
               "--questions", str(question_file), "--methods", ALL_METHODS, "--max-new-tokens", "12",
               "--max-steps", "4", "--threshold", "0.3", "--verify-low-confidence", "--dtype", "float32",
               "--out", str(out)])
    assert rc == 0
    return out


def read_answers(out: Path, method: str) -> list[dict]:
    return [json.loads(line) for line in (out / "model_answer" / f"{method}.jsonl").read_text().splitlines()]


def test_every_output_is_written(bench_run):
    for name in ("summary.json", "report.md", "speedup_by_category.png", "accept_lengths.png", "ctar.png"):
        assert (bench_run / name).is_file(), name
    summary = json.loads((bench_run / "summary.json").read_text())
    assert set(summary) >= {"config", "machine", "methods", "baseline", "reference"}
    assert summary["machine"]["torch_threads"] == 1 and summary["machine"]["engine"]["engine"] == "fused"
    assert summary["machine"]["engine"]["dtype"] in ("float32", "bfloat16")
    assert summary["machine"]["torch"] and summary["machine"]["transformers"] and summary["machine"]["cpu"] is not None
    for key in ("others_cpu_share_before", "others_cpu_share_during"):  # measured, on Linux
        assert 0.0 <= summary["machine"][key] <= 1.0, key
    assert summary["baseline"] in ("ar", "ar-eager", "ar-hf", "ar-hf-static") and summary["reference"] == "ar"
    assert list(summary["methods"]) == ALL_METHODS.split(",")
    tasks = ["mt_bench", "translation", "math_reasoning", "rag"]
    for name, entry in summary["methods"].items():
        assert list(entry["by_category"]) == tasks
        for m in (entry["overall"], *entry["by_category"].values()):
            for key in ("tokens_per_s", "speedup", "speedup_vs_ar_hf", "compression_rate", "acceptance_rate", "ctar",
                        "mean_draft_length", "identical_fraction", "new_tokens", "wall_time"):
                assert key in m, (name, key)
        o = entry["overall"]
        if name in ("kangaroo", "kangaroo-chain", "kangaroo-fixed", "early-exit", "kangaroo-tree", "kangaroo+pld",
                    "kangaroo-full-vocab"):  # a random adapter's drafts fall below η: --verify-low-confidence
            # still sends one per round; lookup drafts up to 8; a tree adds its 2 siblings (and the lookup branch)
            expected = {"kangaroo": max(4, LOOKUP), "kangaroo-full-vocab": max(4, LOOKUP), "kangaroo-tree": 4 + 2,
                        "kangaroo+pld": 4 + LOOKUP}.get(name, 4)
            assert len(o["ctar"]) == expected, name
            assert 0.0 <= o["acceptance_rate"] <= 1.0 and o["mean_draft_length"] > 0
            assert set(o["accepted_from"]) <= {"adapter", "lookup"}
        elif name == "lookup":  # prompt lookup alone: LOOKUP proposed tokens at most, γ = 0
            assert len(o["ctar"]) == LOOKUP and set(o["accepted_from"]) <= {"lookup"}
        elif name == "pld":  # transformers' default of 10 proposed tokens
            assert len(o["ctar"]) == 10 and 0.0 <= o["acceptance_rate"] <= 1.0
        else:
            assert o["ctar"] is None and o["acceptance_rate"] is None
    # kangaroo-fixed never stops drafting early: every round drafts γ unless the token budget is shorter
    fixed = summary["methods"]["kangaroo-fixed"]["overall"]
    assert fixed["mean_draft_length"] > summary["methods"]["kangaroo-chain"]["overall"]["mean_draft_length"] - 1e-9
    report = (bench_run / "report.md").read_text()
    assert "| `kangaroo` |" in report and "CTAR" in report and "![ctar.png](ctar.png)" in report
    assert "| kangaroo | adapter |" in report or "| kangaroo | lookup |" in report


def test_costs_only_writes_step_costs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from kangaroo.bench import costs as costs_module

    monkeypatch.setattr(costs_module, "LONG_CONTEXT", 160)  # the tiny model's context is 256
    monkeypatch.chdir(tmp_path)  # no Spec-Bench file above: --costs-only does not need one
    monkeypatch.delenv("KANGAROO_SPEC_BENCH", raising=False)
    out = tmp_path / "costs"
    assert main(["bench", "--model", str(tiny_model_dir), "--adapter", "random", "--threads", "1", "--costs-only",
                 "--out", str(out)]) == 0
    costs = json.loads((out / "costs.json").read_text())
    assert costs["machine"]["threads"] == 1 and costs["machine"]["cpu"] is not None
    for name in ("chosen", "chosen, 160 cached tokens", "float32 eager"):
        e = costs[name]
        assert set(e["forward_ms"]) == {"1", "2", "4", "8", "16"} and all(v > 0 for v in e["forward_ms"].values())
        assert e["draft_step_ms"] > 0 and e["lm_head_ms"] > 0 and e["prefill_ms"] > 0 and e["engine"]["dtype"]
        assert e["forward_ratio_8_to_1"] == pytest.approx(e["forward_ms"]["8"] / e["forward_ms"]["1"], abs=1e-3)
    assert costs["chosen"]["engine"]["engine"] == "fused" and costs["float32 eager"]["engine"]["engine"] == "eager"
    assert set(costs["chosen"]["tree_extra_ms"]) == {"1", "2"} and "tree_extra_ms" not in costs["float32 eager"]
    assert costs["chosen"]["context"] == 256 and costs["chosen, 160 cached tokens"]["context"] == 160
    assert "| chosen, 160 cached tokens: fused " in capsys.readouterr().out  # the printed table has its row
    assert not (out / "summary.json").exists()  # no questions were run


def test_answer_files_follow_spec_bench_layout(bench_run):
    for method in ALL_METHODS.split(","):
        rows = read_answers(bench_run, method)
        assert [r["question_id"] for r in rows] == [q["question_id"] for q in QUESTIONS]
        for r, q in zip(rows, QUESTIONS):
            assert r["category"] == q["category"] and r["model_id"].endswith(method)
            c = r["choices"][0]
            assert c["index"] == 0
            assert len(c["turns"]) == len(c["new_tokens"]) == len(c["wall_time"]) == len(q["turns"])
            assert sum(c["accept_lengths"]) == sum(c["new_tokens"])  # every token counted once
            assert all(t > 0 for t in c["wall_time"]) and all(0 < n <= 12 for n in c["new_tokens"])


def test_outputs_are_identical_to_autoregressive(bench_run):
    """The lossless check: greedy Kangaroo (every variant) reproduces our plain greedy decoding on the
    same engine (the identity reference), and in float32 on a tiny model (no near-ties) so do HF's
    loops and PLD."""
    reference = read_answers(bench_run, "ar")
    for method in ALL_METHODS.split(","):
        for r, ref in zip(read_answers(bench_run, method), reference):
            assert r["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"], (method, r["question_id"])
            assert r["choices"][0]["turns"] == ref["choices"][0]["turns"]
            assert r["choices"][0]["identical"] is True and r["choices"][0]["mismatch"] is None
    summary = json.loads((bench_run / "summary.json").read_text())
    assert all(e["overall"]["identical_fraction"] == 1.0 for e in summary["methods"].values())


def test_speed_and_accepted_tokens_recomputed_from_answer_files_alone(bench_run):
    """Spec-Bench's evaluation/speed.py, re-done by hand: per-answer speed = sum(new_tokens)/sum(wall_time);
    tokens/s = mean over answers; speedup = ratio of the means; #mean accepted tokens = mean of the
    pooled accept_lengths. (speed.py re-tokenises the baseline's text to count its tokens; we count ids.)"""
    summary = json.loads((bench_run / "summary.json").read_text())
    baseline = summary["baseline"]
    def member(task):
        return lambda r: task == "overall" or task_of(r["category"]) == task

    groups = {t: member(t) for t in ["overall", *summary["tasks"]]}
    base_rows = read_answers(bench_run, baseline)
    for method in ALL_METHODS.split(","):
        rows = read_answers(bench_run, method)
        for group, keep in groups.items():
            speeds = [sum(r["choices"][0]["new_tokens"]) / sum(r["choices"][0]["wall_time"]) for r in rows if keep(r)]
            speeds0 = [sum(r["choices"][0]["new_tokens"]) / sum(r["choices"][0]["wall_time"]) for r in base_rows if keep(r)]
            accept = [n for r in rows if keep(r) for n in r["choices"][0]["accept_lengths"]]
            m = summary["methods"][method]["overall" if group == "overall" else "by_category"]
            m = m if group == "overall" else m[group]
            assert m["tokens_per_s"] == pytest.approx(mean(speeds), rel=1e-9)
            assert m["speedup"] == pytest.approx(mean(speeds) / mean(speeds0), rel=1e-9)
            assert m["compression_rate"] == pytest.approx(mean(accept), rel=1e-9)
            # time to first token (our decoders record it; transformers' generate does not) and what follows it
            choices = [r["choices"][0] for r in rows if keep(r)]
            if issubclass(METHODS[method], _HFGenerate):
                assert all("first_token_time" not in c for c in choices) and m.get("prefill_share") is None
                continue
            assert all(0 < f < w for c in choices for f, w in zip(c["first_token_time"], c["wall_time"]))
            first = sum(f for c in choices for f in c["first_token_time"])
            assert m["prefill_share"] == pytest.approx(first / sum(sum(c["wall_time"]) for c in choices), rel=1e-9)
            decode = mean((sum(c["new_tokens"]) - len(c["new_tokens"])) / (sum(c["wall_time"]) - sum(c["first_token_time"]))
                          for c in choices)
            assert m["decode_tokens_per_s"] == pytest.approx(decode, rel=1e-9)
            base = summary["methods"][baseline]["overall" if group == "overall" else "by_category"]
            base = base if group == "overall" else base[group]
            if base.get("decode_tokens_per_s"):  # a transformers baseline records no first-token time
                assert m["decode_speedup"] == pytest.approx(decode / base["decode_tokens_per_s"], rel=1e-9)
            else:
                assert m["decode_speedup"] is None


def test_ctar_and_rounds_by_hand():
    # two turns: [prefill, round, round] + [prefill, round]; drafts 0,3,2 | 0,4
    choice = {"turns": ["a", "b"], "new_tokens": [1 + 4 + 1, 1 + 3], "accept_lengths": [1, 4, 1, 1, 3], "draft_lengths": [0, 3, 2, 0, 4]}
    rounds = metrics.verification_rounds(choice)
    assert rounds == [(3, 3), (2, 0), (4, 2)]
    assert metrics.ctar(rounds, 4) == [2 / 3, 2 / 3, 1 / 2, 0.0]
    assert metrics.ctar([], 2) == [None, None]
    m = metrics.group_metrics([{"question_id": 1, "category": "writing", "choices": [dict(choice, wall_time=[1.0, 1.0])]}], 4)
    assert m["acceptance_rate"] == pytest.approx(5 / 9)
    assert m["mean_draft_length"] == pytest.approx(3.0)
    assert m["compression_rate"] == pytest.approx(10 / 5)
    assert m["tokens_per_s"] == pytest.approx(5.0)
    assert m["accept_length_histogram"] == {"1": 1, "3": 1, "4": 1}


def test_question_selection(question_file):
    assert [q["question_id"] for q in load_questions(question_file, ["mt_bench"])] == [81, 82]
    assert [q["question_id"] for q in load_questions(question_file, ["coding", "rag"])] == [82, 321]
    a = load_questions(question_file, per_category=1, seed=3)
    assert a == load_questions(question_file, per_category=1, seed=3)
    assert sorted(task_of(q["category"]) for q in a) == ["math_reasoning", "mt_bench", "rag", "translation"]
    with pytest.raises(KangarooError, match="unknown categories"):
        load_questions(question_file, ["poetry"])
    with pytest.raises(KangarooError, match="per-category"):
        load_questions(question_file, per_category=0)


def test_missing_question_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KANGAROO_SPEC_BENCH", str(tmp_path / "nope.jsonl"))
    with pytest.raises(KangarooError, match="KANGAROO_SPEC_BENCH"):
        load_questions()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": "not a list"}\n')
    with pytest.raises(KangarooError, match="bad.jsonl:1"):
        load_questions(bad)


def test_unknown_method_is_a_user_error(tiny_model_dir, question_file, tmp_path, capsys):
    rc = main(["bench", "--model", str(tiny_model_dir), "--adapter", "random", "--questions", str(question_file),
               "--methods", "ar,medusa", "--out", str(tmp_path)])
    assert rc == 2 and "unknown method(s) medusa" in capsys.readouterr().err


def test_sweep_prints_the_best_setting(tiny_model_dir, question_file, tmp_path, capsys):
    rc = main(["bench", "--model", str(tiny_model_dir), "--adapter", "random", "--threads", "1", "--sweep",
               "--questions", str(question_file), "--categories", "translation", "--max-new-tokens", "6",
               "--sweep-exit-layers", "1,2", "--sweep-max-steps", "2", "--sweep-thresholds", "0.3,0.9",
               "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "best setting on this machine: kangaroo[" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["sweep"]["ranking"]) == 4
    assert {"ar-hf", "ar"} <= set(summary["methods"])


def test_benchmarks_markdown(bench_run, tmp_path):
    from kangaroo.bench import report
    from kangaroo.bench.report import PAPER, write_benchmarks

    summary = json.loads((bench_run / "summary.json").read_text())
    write_benchmarks(summary, bench_run, tmp_path / "BENCHMARKS.md", tmp_path / "docs" / "benchmarks", "scripts/make_benchmarks.sh")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    lines = text.splitlines()
    headings = [line for line in lines if line.startswith("#")]
    assert headings == ["# Benchmarks", "## Results on this machine", "### Speedup by category",
                        "### Mean accepted tokens by category", "### CTAR(w)", "### Where Kangaroo loses",
                        "### Where accepted tokens came from", "### Output identity", "### Plots",
                        "## Where the gain comes from", "## Next to the published numbers", "## Definitions",
                        "## Reproduce"]
    gains = lines[lines.index("## Where the gain comes from"):lines.index("## Next to the published numbers")]
    assert len([line for line in gains if line.startswith("| ") and "`" in line]) == len(report.GAIN_PAIRS)
    assert "${" not in text  # the template is filled
    template = (Path(report.__file__).parent / report.TEMPLATE).read_text()
    assert "/work/" not in template and "NOTES.md" not in template  # its prose names no file outside the repo
    results = lines[lines.index("## Results on this machine") + 1 : lines.index("### Speedup by category")]
    overall = [line for line in results if line.startswith("| `")]
    assert [line.split("`")[1] for line in overall] == list(summary["methods"])  # one overall row per method
    published = [line for line in lines if line.startswith("| ") and ("Vicuna-7B, A100" in line or "(this run)" in line)]
    assert len(published) == len(PAPER) + sum(m in summary["methods"] for m in ("kangaroo", "kangaroo-fixed", "early-exit", "pld"))
    for plot in ("speedup_by_category.png", "accept_lengths.png", "ctar.png"):
        assert f"![{plot}](docs/benchmarks/{plot})" in lines and (tmp_path / "docs" / "benchmarks" / plot).is_file()
    assert lines[-2:] == ["scripts/make_benchmarks.sh", "```"]


def test_a_mismatch_is_located_and_its_logit_gap_measured(tiny_model_dir):
    from kangaroo.api import KangarooModel
    from kangaroo.benchmark import check_identical

    from kangaroo.decoding import next_token_logits

    km = KangarooModel.from_pretrained(str(tiny_model_dir), adapter="random")
    prompt = km.encode("Hello").tolist()[0]
    ref = km.baseline.generate(torch.tensor([prompt]), 8, km.eos_token_ids).token_ids
    bad = ref[:3] + [(ref[3] + 1) % 49152] + ref[4:]

    def answer(ids):
        return {"question_id": 1, "category": "qa", "choices": [{"token_ids": [ids], "identical": None, "mismatch": None}]}

    answers = {"ar": [answer(ref)], "broken": [answer(bad)], "same": [answer(list(ref))]}
    prompts = {name: {1: [prompt]} for name in answers}
    check_identical(km, answers, prompts, "ar")
    assert answers["ar"][0]["choices"][0]["identical"] is True
    assert answers["same"][0]["choices"][0]["identical"] is True
    choice = answers["broken"][0]["choices"][0]
    assert choice["identical"] is False
    mm = choice["mismatch"]
    assert (mm["turn"], mm["position"], mm["reference_token"], mm["token"]) == (0, 3, ref[3], bad[3])
    logits = next_token_logits(km.engine, torch.tensor([prompt + ref[:3]]))  # the reference's own engine
    top2 = logits.topk(2).values
    assert mm["top2_logit_gap"] == pytest.approx(float(top2[0] - top2[1]), abs=1e-4) and mm["top2_logit_gap"] >= 0
    m = metrics.summarize({n: [dict(a, choices=[dict(a["choices"][0], turns=["x"], new_tokens=[8], wall_time=[1.0],
                                                     accept_lengths=[1] * 8)]) for a in rows] for n, rows in answers.items()}, 0)
    assert m["methods"]["broken"]["overall"]["identical_fraction"] == 0.0
    assert m["methods"]["broken"]["overall"]["mismatches"][0]["position"] == 3


def test_contention_meter_sees_another_busy_process():
    """A child process spinning for ~1 s shows up as other processes' CPU use; this process's own
    work does not. Checked in CPU-seconds against what the child and this process really used, so
    other load on the machine (which only adds to both sides) cannot break it."""
    import os
    import resource
    import subprocess
    import sys
    import time

    from kangaroo import contention

    def cpu_seconds(meter_share: float, wall: float) -> float:
        return meter_share * wall * (os.cpu_count() or 1)

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    t, meter = time.perf_counter(), contention.ContentionMeter().start()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"],
                   check=True)
    share, wall = meter.stop(), time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_s = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    assert share is not None and cpu_seconds(share, wall) >= 0.8 * child_s, (share, wall, child_s)

    machine_before = contention._machine_busy_s()
    t, meter = time.perf_counter(), contention.ContentionMeter().start()
    own = time.process_time()
    while time.process_time() - own < 1.0:  # our own busy loop is not "other"
        pass
    share, wall = meter.stop(), time.perf_counter() - t
    machine_s = contention._machine_busy_s() - machine_before  # the same interval, a little wider
    assert cpu_seconds(share, wall) <= machine_s - 0.8, (share, wall, machine_s)


def test_pld_peer_patches_no_transformers_class(tiny_model_dir):
    """transformers' prompt-lookup generator class is untouched while the pld method runs (it counts
    candidates through its own model object only) and after."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator as PLG
    from transformers.generation.utils import GenerationMixin

    from kangaroo.api import KangarooModel
    from kangaroo.bench.methods import Options, PromptLookup

    before = (PLG.get_candidates, GenerationMixin._get_candidate_generator)
    km = KangarooModel.from_pretrained(str(tiny_model_dir), adapter="random", dtype="float32")
    seen = []
    original = km.model.forward

    def forward(*args, **kwargs):  # runs inside generate: the class must be untouched there too
        seen.append((PLG.get_candidates, GenerationMixin._get_candidate_generator) == before)
        return original(*args, **kwargs)

    km.model.forward = forward
    run = PromptLookup(km, Options()).generate(km.encode("one two three one two three one two"), 12)
    assert seen and all(seen)
    assert (PLG.get_candidates, GenerationMixin._get_candidate_generator) == before
    assert "_get_candidate_generator" not in km.model.__dict__
    assert len(run.draft_lengths) == len(run.accept_lengths) and sum(run.accept_lengths) == len(run.token_ids)


@pytest.mark.skipif(not kernel_available("dpbf16", torch.bfloat16, "cpu"), reason="needs AVX512-BF16 (dpbf16)")
def test_a_second_turn_reuses_the_first_prompt_but_no_question_starts_warm(tiny_model_dir, tmp_path):
    """Our methods keep a question's first prompt for its second turn (exact: kangaroo.decoding.
    PromptCache), and the answer files say how many tokens each turn reused; the warm-up ran the
    first question's own prompt, yet no first turn reuses anything."""
    note = "The sea is salty because rivers carry salt from the rocks into it. " * 3
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 91, "category": "writing", "turns": [note + "Write a short poem about it.", "Now make it rhyme, please."]},
        {"question_id": 92, "category": "writing", "turns": [note + "Explain it to a child.", "Now in one sentence, please."]}]))
    rc = main(["bench", "--model", str(tiny_model_dir), "--adapter", "random", "--threads", "1",
               "--questions", str(questions), "--methods", "ar,kangaroo", "--max-new-tokens", "12",
               "--dtype", "bfloat16", "--kernel", "dpbf16", "--attention", "kernel", "--no-plots", "--out", str(tmp_path / "out")])
    assert rc == 0
    for method in ("ar", "kangaroo"):
        for r in read_answers(tmp_path / "out", method):
            c = r["choices"][0]
            assert len(c["cached_tokens"]) == len(c["turns"]) and c["cached_tokens"][0] == 0
            if len(c["turns"]) == 2:
                assert c["cached_tokens"][1] > 0
    assert {r["choices"][0]["identical"] for r in read_answers(tmp_path / "out", "kangaroo")} == {True}
