"""Every Python snippet of README.md and docs/*.md runs (pytest-examples).

Each fenced ``python`` block is executed as written, in a fresh module whose globals hold small
real stand-ins for the names a snippet takes from its surroundings (``model`` is a tiny GPT-2,
``dataset`` a few hundred tokenized rows with a ``domain`` label, ``texts`` short texts on three
topics, ...; see :func:`doc_globals`), in a temporary working directory. Where a snippet shows
output as ``#>`` comments after a ``print``, the printed output must match.

A snippet that cannot run here is marked with the plugin's fence settings,
````` ```python test="skip" reason="..." `````; keep that rare. New pages under docs/ are picked
up automatically.
"""

from __future__ import annotations

import itertools
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from pytest_examples import CodeExample, EvalExample, find_examples

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = [ex for page in PAGES for ex in find_examples(page)]

M, B, T, VOCAB = 3, 4, 12, 60
TOPICS = [
    "the compiler emits kernels for the gpu and the cache holds the tensor tiles",
    "the orchestra played a slow symphony and the violin carried the melody home",
    "the recipe needs flour butter sugar and the oven must bake the bread slowly",
]


def _texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(TOPICS)
    words = [t.split() for t in TOPICS]
    texts = [" ".join(rng.choice(words[d], size=8)) for d in labels]
    return texts, labels


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=T,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)  # from a config: no weight download


def doc_globals(tmp_path: Path) -> dict:
    """What the snippets take from their surroundings, as small real objects."""
    model = _tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    n = 24
    domain = torch.arange(n) % M
    # Each domain lives in its own slice of the vocabulary.
    ids = torch.randint(0, VOCAB // M, (n, T), generator=g) + domain[:, None] * (VOCAB // M)
    dataset = [{"input_ids": ids[i], "domain": int(domain[i])} for i in range(n)]

    def batch_of(rows):
        return {"input_ids": ids[rows], "domain": domain[rows]}

    def loss_fn(model, batch, reduction="mean"):
        x = batch["input_ids"]
        logits = model(x).logits[:, :-1]
        tok = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="none"
        ).view(len(x), -1)
        per_sample = tok.mean(1)
        return per_sample if reduction == "none" else per_sample.mean()

    def specific_set_loss(model, batch):
        return loss_fn(model, batch, reduction="none").sum()

    spe = batch_of(torch.arange(0, n, M))  # a few domain-0 rows: the specific set
    texts, _ = _texts(90, seed=0)
    eval_texts, _ = _texts(30, seed=1)
    # Two-level structure for DGADistribution: 6 fine clusters, 2 coarse ones.
    fine = (torch.arange(n) % 6).numpy()
    out = {
        "np": np,
        "torch": torch,
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=1e-2),
        "m": M,
        "B": B,
        "p_eval": np.array([0.5, 0.3, 0.2]),
        "dataset": dataset,
        "domain_labels": domain.tolist(),
        "batch": batch_of(torch.arange(B)),
        "texts": texts,
        "tokenize": lambda text: torch.tensor(
            [sum(map(ord, w)) % VOCAB for w in (text.split() * T)[:T]]
        ),
        "eval_texts": eval_texts,
        "loss_fn": loss_fn,
        "specific_set_loss": specific_set_loss,
        "spe": spe,
        "spe_iter": itertools.cycle([spe]),
        "one_batch_per_domain": lambda: [batch_of(torch.arange(d, 12, M)) for d in range(M)],
        "specific_fine_labels": np.array([0, 0, 1, 3]),
        "coarse_of_fine": np.array([0, 0, 0, 1, 1, 1]),
        "fine_cluster_labels": fine,
        "target_fn": lambda: specific_set_loss(model, spe),
    }
    import rnb_kernels as rnb

    out["rnb"] = rnb  # the pages import it once, in their first snippet
    out["mixer"] = rnb.DGA(num_domains=M, step_size=1.0, ema=0.1, update_every=50)
    out["balancer"] = rnb.Balancer(model, rnb.ODM(M))  # the ODM fragment's (no tracker)
    try:
        import datasets
        from transformers import TrainingArguments
    except ImportError:  # the hf extra is missing: a snippet that needs it fails by name
        return out
    out["ds"] = datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": ids.tolist(), "domain": domain.tolist()}
    )
    out["args"] = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=B, max_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    # A jsonl file for the streaming snippet.
    big, _ = _texts(300, seed=2)
    import json

    (tmp_path / "huge.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in big))
    return out


def _id(ex: CodeExample) -> str:
    return f"{ex.path.relative_to(ROOT)}:{ex.start_line}"


def test_every_page_has_its_snippets_collected():
    """The runner sees README.md and every docs page (a page added later is picked up)."""
    pages = {ex.path.name for ex in EXAMPLES}
    assert "README.md" in pages
    assert {"balancer.md", "regroup.md", "demo.md"} <= pages
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("example", EXAMPLES, ids=_id)
def test_doc_snippet_runs(
    example: CodeExample, eval_example: EvalExample, tmp_path, monkeypatch, request
):
    settings = example.prefix_settings()
    if settings.get("test") == "skip":
        reason = settings.get("reason")
        assert reason, f"{_id(example)}: a skipped snippet must say why (reason=...)"
        if "GPU" in reason or "CUDA" in reason:
            request.node.add_marker(pytest.mark.hardware)  # hardware-gated: strict mode accepts
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RNB_CACHE", str(tmp_path / "cache"))
    env = doc_globals(tmp_path)
    failure = None
    try:
        if "#>" in example.source:
            eval_example.run_print_check(example, module_globals=env)
        else:
            eval_example.run(example, module_globals=env)
    except (Exception, pytest.fail.Exception) as exc:
        # Reported as plain text: the plugin's rewritten traceback trips pytest's formatter.
        frames, tb = [], exc.__traceback__
        while tb is not None:  # file:line only (the snippet's code has no column table)
            frames.append(f"  {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}")
            tb = tb.tb_next
        what = "".join(traceback.format_exception_only(exc)).strip()
        failure = f"{_id(example)}: {what}\n" + "\n".join(frames[-6:])
    if failure is not None:
        pytest.fail(failure, pytrace=False)
