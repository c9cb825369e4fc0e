"""likelihood.py: log-likelihoods by hand, the scores against lm-evaluation-harness itself, data
errors, toy tasks."""

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import dataio
import errors
import likelihood
import toy

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(
    not HAS_LM_EVAL, reason="lm-eval (test-only oracle) is not installed"
)


@pytest.fixture(scope="module")
def base():
    return toy.load_model(), toy.load_tokenizer()


def _hand_loglik(model64, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log p(cont | ctx) of a float64 copy of the model, one unpadded sequence, full logits."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model64(input_ids=ids).logits[0].double().log_softmax(-1)
    rows = logp[len(ctx) - 1 : -1]  # position t predicts token t + 1
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_loglikelihood_equals_float64_hand_computation(base):
    model, tok = base
    model64 = copy.deepcopy(model).double()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731  (one id per character)
    story = "Milo the fox and Ruby the owl lived by the river.\nMilo had 3 acorns and Ruby had 5.\n"
    cases = [  # (context, continuation, the token split lm-eval makes, written out by hand)
        (
            story + "On Monday morning, Milo found 2 acorns, so",
            " Milo",
            enc(story + "On Monday morning, Milo found 2 acorns, so"),
            enc(" Milo"),
        ),
        (
            "",
            "Ann has 47 apples.",
            [tok.eos_token_id],
            enc("Ann has 47 apples."),
        ),  # empty context: EOS (no BOS)
        (
            "Q: Ann has 47 apples. She gets 85 more. How many apples now?\nA: ",
            "47+85=132",  # trailing space moves
            enc("Q: Ann has 47 apples. She gets 85 more. How many apples now?\nA:"),
            enc(" 47+85=132"),
        ),
        (
            "Question: 12+30\nAnswer:",
            " 12+30=42 zebra",
            enc("Question: 12+30\nAnswer:"),
            enc(" 12+30=42 zebra"),
        ),
    ]
    requests = [(c, x) for c, x, _, _ in cases]
    for bs in (1, 3):
        got = likelihood.loglikelihood(model, tok, requests, batch_size=bs)
        for (c, x, ctx, cont), (ll, greedy) in zip(cases, got):
            assert likelihood.encode_pair(tok, c, x) == (ctx, cont)
            ref_ll, ref_greedy = _hand_loglik(model64, ctx, cont)
            assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-4), (
                c[-30:],
                x,
            )  # fp32 model vs fp64 copy
            assert greedy == ref_greedy, (c[-30:], x)
    flags = [g for _, g in got]
    assert flags[0] and not flags[3], (
        flags
    )  # the name copy is greedy, the zebra is not: the flag is non-vacuous

    # left truncation: only the last max_length + 1 tokens take part
    ((ll, greedy),) = likelihood.loglikelihood(model, tok, [cases[0][:2]], max_length=12)
    whole = cases[0][2] + cases[0][3]
    ref_ll, ref_greedy = _hand_loglik(model64, whole[-13 : -len(cases[0][3])], cases[0][3])
    assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-4) and greedy == ref_greedy
    with pytest.raises(ValueError, match="nothing to score"):
        likelihood.loglikelihood(model, tok, [("abc", "")])


def test_loglikelihood_on_a_lora_model_in_train_mode(base):
    """A LoRA-wrapped model (adapters made non-zero, dropout 0.5, train mode) scores like its own
    eval-mode forward with full logits, and is left in train mode."""
    import lora

    model, tok = base
    torch.manual_seed(0)
    wrapped = lora.add_lora(copy.deepcopy(model), r=4, alpha=8, dropout=0.5)
    for _, layer in lora.lora_layers(wrapped):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    wrapped.train()
    requests = [("Milo the fox lived by the", " river."), ("", "Ann has 47 apples.")]
    got = [likelihood.loglikelihood(wrapped, tok, requests) for _ in range(2)]
    assert wrapped.training and got[0] == got[1]
    wrapped.eval()
    for (c, x), (ll, greedy) in zip(requests, got[0]):
        ref_ll, ref_greedy = _hand_loglik(wrapped, *likelihood.encode_pair(tok, c, x))
        assert (
            ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-5) and greedy == ref_greedy
        )  # fp32, padded vs not
    assert got[0] != likelihood.loglikelihood(
        model, tok, requests
    )  # the adapters do change the scores


# ---- The oracle: lm-evaluation-harness on the same documents and the same model ------------------


def _oracle_docs() -> dict[str, list[dict]]:
    """A few dozen documents per task in the hub schemas: toy ones, plus choices of unequal length
    (so acc, acc_norm and a normalisation by the wrong length disagree), ARC's numeric labels and
    3-choice questions, and LAMBADA texts with a double space, a newline inside the last word and no
    space at all (empty context)."""
    lam = likelihood.load_task("toy_lambada", limit=24)
    lam += [
        {"text": "Milo the fox lived by the  river"},
        {"text": "river"},
        {"text": "Finn had 7 berries and Theo had\n7"},
    ]
    arc = likelihood.load_task("toy_arc", limit=12)
    for i, d in enumerate(
        likelihood.load_task("toy_arc", limit=36)[12:]
    ):  # bare numbers of 1 to 3 characters
        v = int(d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])].split("=")[1])
        values = [str(w) for w in (v, v + 1, 10 * v + 7, 100 + v)][
            : 3 + (i % 4 != 3)
        ]  # some with three choices
        labels = (
            [str(j + 1) for j in range(len(values))] if i % 2 else list("ABCD"[: len(values)])
        )  # ARC uses both
        arc.append(
            {
                "id": f"mc/{i}",
                "question": d["question"],
                "answerKey": labels[i % len(values)],
                "choices": {"text": values, "label": labels},
            }
        )
    piqa = likelihood.load_task("toy_piqa", limit=12)
    stories = toy.documents("test", 32, 2, domains=("story",))
    for i in range(16):
        a, b = stories[2 * i]["text"].split("\n"), stories[2 * i + 1]["text"].split("\n")
        true, other = a[3], b[min(3 + i % 3, len(b) - 1)]
        piqa.append(
            {
                "goal": "\n".join(a[:3]),
                "sol1": [true, other][i % 2],
                "sol2": [other, true][i % 2],
                "label": i % 2,
            }
        )
    return {"lambada_openai": lam, "arc_easy": arc, "piqa": piqa}


def _local_task_yaml(task: str, data_file: str, out_dir, cache_dir: str) -> str:
    """lm-eval's own YAML for `task` (its prompt, target, choices and metrics untouched), pointed at
    a local JSONL file through the `json` builder, under the name local_<task>."""
    import yaml

    src = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    folder = {"lambada_openai": "lambada", "arc_easy": "arc", "piqa": "piqa"}[task]
    cfg = yaml.safe_load((src / folder / f"{task}.yaml").read_text())
    split = cfg.get("test_split") or cfg["validation_split"]
    cfg.pop("tag", None)
    cfg.update(
        task=f"local_{task}",
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: data_file}, "cache_dir": cache_dir},
        training_split=None,
        validation_split=None,
        fewshot_split=None,
        test_split=split,
    )
    (Path(out_dir) / f"local_{task}.yaml").write_text(yaml.safe_dump(cfg))
    return cfg["task"]


@needs_lm_eval
def test_scores_equal_lm_eval_simple_evaluate(base, tmp_path, monkeypatch):
    """lm-eval's simple_evaluate (HFLM over the same toy model instance, zero-shot, its own task
    YAMLs pointed at local JSONL copies of the documents through the `json` builder, offline)
    against score_task on the same files: every metric and stderr, and per document the requests,
    log-likelihoods and greedy flags. Tolerance 1e-6 relative (an fp32 model; the two batch
    differently, so sums differ in the last bits); perplexity's stderr through the same seeded
    bootstrap streams (2000 resamples here)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv(
        "DISABLE_MULTIPROC", "1"
    )  # the harness's bootstrap in-process, not a pool of workers
    model, tok = base
    docs = _oracle_docs()
    (tmp_path / "tasks").mkdir()
    names, files = {}, {}
    for task, rows in docs.items():
        files[task] = tmp_path / f"{task}.jsonl"
        dataio.write_jsonl(files[task], rows)
        names[task] = _local_task_yaml(
            task, str(files[task]), tmp_path / "tasks", str(tmp_path / "hf_cache")
        )
    lm = HFLM(pretrained=model, tokenizer=toy.load_tokenizer(), batch_size=8)
    evaluated = simple_evaluate(
        model=lm,
        tasks=list(names.values()),
        num_fewshot=0,
        bootstrap_iters=2000,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )
    decisive = {"acc vs acc_norm": 0, "len(choice) vs len(' ' + choice)": 0}
    for task, name in names.items():
        ours = likelihood.score_task(
            task,
            likelihood.load_task(task, str(files[task])),
            model,
            tok,
            batch_size=5,
            bootstrap_iters=2000,
        )
        theirs = evaluated["results"][name]
        assert ours["n"] == len(docs[task])
        metrics = ["acc", "perplexity"] if task == "lambada_openai" else ["acc", "acc_norm"]
        for m in metrics:
            assert ours[m] == pytest.approx(theirs[f"{m},none"], rel=1e-6), (task, m)
            assert ours[f"{m}_stderr"] == pytest.approx(theirs[f"{m}_stderr,none"], rel=1e-6), (
                task,
                m,
            )
        # per document: the same requests (prompt formats), the same log-likelihoods and greedy
        # flags
        for sample in evaluated["samples"][name]:
            doc = docs[task][int(sample["doc_id"])]
            requests, choices = likelihood._requests(likelihood.KIND[task], doc)
            args = (
                [sample["arguments"]]
                if isinstance(sample["arguments"][0], str)
                else sample["arguments"]
            )
            assert [tuple(a) for a in args] == requests
            got = likelihood.loglikelihood(model, tok, requests)
            for (ll, greedy), (ll2, greedy2) in zip(got, sample["filtered_resps"]):
                # abs: fp32 rounding of a log-prob near 0 (a few 1e-7 here) is large relative to it
                assert ll == pytest.approx(ll2, rel=1e-6, abs=1e-5) and greedy == greedy2, requests
            # do these documents tell the normalisations apart? (else acc_norm is not under test)
            if choices:
                lls, lens = [ll for ll, _ in got], [len(c) for c in choices]
                gold = int(sample["target"])
                pick = lambda score: max(range(len(lls)), key=score) == gold  # noqa: E731
                norm = pick(lambda i: lls[i] / lens[i])
                decisive["acc vs acc_norm"] += norm != pick(lambda i: lls[i])
                decisive["len(choice) vs len(' ' + choice)"] += norm != pick(
                    lambda i: lls[i] / (lens[i] + 1)
                )
    assert all(decisive.values()), decisive


@needs_lm_eval
@pytest.mark.parametrize("which", ["toy", "qwen3"])
def test_tokenization_and_loglikelihood_equal_hflm(which, tmp_path):
    """HFLM.loglikelihood on the same requests (its own tokenization, batching and greedy check),
    with the toy character tokenizer and with the real Qwen3 tokenizer on a tiny random Qwen3
    (151,936 vocab): BPE merges across the context/continuation boundary, EOS as the empty context,
    Qwen's no-BOS default."""
    from conftest import save_tiny_qwen3
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if which == "toy":
        model, make_tok = toy.load_model(), toy.load_tokenizer
    else:
        path = save_tiny_qwen3(tmp_path / "qwen3")
        model, make_tok = (
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            lambda: AutoTokenizer.from_pretrained(path),
        )
    requests = [
        ("Question: Ann has 47 apples.\nAnswer:", " 47+85=132"),
        ("", "Milo the fox"),
        ("The answer is ", "42."),
        ("Line one\n", "Line two"),
        ("It costs 3", "00 dollars"),
        ("café au", " lait"),
        ("x", " y" * 30),
    ]
    lm = HFLM(pretrained=model, tokenizer=make_tok(), batch_size=3)
    tok = make_tok()
    for c, x in requests:
        if c:
            assert likelihood.encode_pair(tok, c, x) == lm._encode_pair(c, x)
    theirs = lm.loglikelihood(
        [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True
    )
    ours = likelihood.loglikelihood(model, tok, requests, batch_size=2)
    for r, (ll, g), (ll2, g2) in zip(requests, ours, theirs):
        assert ll == pytest.approx(ll2, rel=1e-6, abs=1e-5) and g == g2, r


# ---- Documents: errors, toy tasks, and the toy base against a random model -----------------------


@pytest.mark.parametrize(
    "task,rows,line,field",
    [
        (
            "arc_easy",
            [
                {
                    "id": "1",
                    "question": "q",
                    "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                    "answerKey": "A",
                },
                {"id": "2", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}},
            ],
            3,
            "answerKey",
        ),
        (
            "arc_easy",
            [
                {
                    "id": "2",
                    "question": "q",
                    "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                    "answerKey": "C",
                }
            ],
            1,
            "answerKey",
        ),
        (
            "arc_easy",
            [
                {
                    "id": "2",
                    "question": "q",
                    "choices": {"text": ["a"], "label": ["A"]},
                    "answerKey": "A",
                }
            ],
            1,
            "choices",
        ),
        (
            "piqa",
            [
                {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
                {"goal": "g", "sol1": "a", "sol2": "b", "label": 2},
            ],
            3,
            "label",
        ),
        ("piqa", [{"goal": "g", "sol1": "a", "sol2": "b", "label": True}], 1, "label"),
        ("lambada_openai", [{"text": "a b"}, {"text": 7}], 3, "text"),
    ],
)
def test_load_task_bad_row_names_file_line_and_field(tmp_path, task, rows, line, field):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps(r) for r in rows]
    path.write_text(
        "\n\n".join(lines) + "\n"
    )  # a blank line between rows: line numbers are file lines
    with pytest.raises(errors.DataError) as e:
        likelihood.load_task(task, str(path))
    msg = str(e.value)
    assert f"{path}:{line}:" in msg and repr(field) in msg and "\n" not in msg, msg


def test_load_task_other_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"text": \n')
    with pytest.raises(errors.DataError, match=f"{bad}:2: malformed JSON"):
        likelihood.load_task("lambada_openai", str(bad))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist(
            [
                {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
                {"goal": "g", "sol1": "a", "sol2": "b", "label": 5},
            ]
        ),
        tmp_path / "p.parquet",
    )
    with pytest.raises(errors.DataError, match=r"p\.parquet: row 2: field 'label'"):
        likelihood.load_task("piqa", str(tmp_path / "p.parquet"))
    pq.write_table(
        pa.Table.from_pylist(
            [{"goal": "g", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(3)]
        ),
        tmp_path / "ok.parquet",
    )
    assert likelihood.load_task("piqa", str(tmp_path / "ok.parquet"), limit=2)[1]["label"] == 1
    with pytest.raises(errors.UserError, match="unknown likelihood task 'hellaswag'"):
        likelihood.load_task("hellaswag")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "datasets" else real_find_spec(n, *a),
    )
    with pytest.raises(errors.UserError, match="baber/piqa needs `datasets`"):
        likelihood.load_task("piqa")
    monkeypatch.undo()
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(
        errors.UserError, match=r"cannot load allenai/ai2_arc \(ARC-Easy, test split\)"
    ):
        likelihood.load_task("arc_easy")


def test_toy_tasks_are_deterministic_and_well_formed():
    for task in likelihood.TOY_TASKS:
        docs = likelihood.load_task(task, limit=50)
        assert docs == likelihood.load_task(task, limit=50) and len(docs) == 50
        assert len({json.dumps(d, sort_keys=True) for d in docs}) == 50, task  # no duplicates
        for d in docs:
            likelihood._check_doc(likelihood.KIND[task], d, task)
    for d in likelihood.load_task(
        "toy_arc", limit=50
    ):  # equal-length choices: no length prior to exploit
        assert len(set(map(len, d["choices"]["text"]))) == 1 and len(set(d["choices"]["text"])) == 4
    for d in likelihood.load_task("toy_piqa", limit=50):
        assert len(d["sol1"]) == len(d["sol2"]) and d["sol1"] != d["sol2"]
    assert len(likelihood.load_task("toy_lambada")) == likelihood.TOY_SIZE


def test_toy_base_beats_chance_and_a_random_model_does_not(base):
    from transformers import Qwen3ForCausalLM

    model, tok = base
    torch.manual_seed(0)
    random_model = Qwen3ForCausalLM(toy.tiny_config()).eval()
    n = 200
    trained = likelihood.run_suite(model, tok, list(likelihood.TOY_TASKS), limit=n)
    untrained = likelihood.run_suite(random_model, tok, list(likelihood.TOY_TASKS), limit=n)
    # measured at n = 200: base toy_arc 0.51, toy_piqa 0.86, toy_lambada acc 0.48 / perplexity 9.8;
    # this random model 0.28, 0.485, 0.0 / 1e8 (seeds 1 and 2: 0.275 / 0.23 and 0.545 / 0.48)
    for task, chance, margin in (("toy_arc", 0.25, 0.15), ("toy_piqa", 0.5, 0.25)):
        assert trained[task]["n"] == n
        assert trained[task]["acc"] >= chance + margin, (task, trained[task])
        assert untrained[task]["acc"] <= chance + 0.1, (task, untrained[task])
    assert trained["toy_lambada"]["acc"] >= 0.35 and untrained["toy_lambada"]["acc"] <= 0.02
    assert (
        trained["toy_lambada"]["perplexity"] < 30 and untrained["toy_lambada"]["perplexity"] > 1e4
    )
    assert all(math.isfinite(v) for r in trained.values() for v in r.values() if v is not None)
