"""Reward modelling: ``trlax train reward`` (outcome reward model) and ``trlax train prm`` (process reward
model).

``reward`` — a Bradley-Terry sequence classifier (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155,
sec. 3.5, eq. 1; TRL ``RewardTrainer``): the run's decoder as trunk plus a fresh scalar head read at the
last real token (:class:`trlax.rollouts.RewardModel`), trained on pairs ``(prompt, chosen, rejected)``
with :func:`trlax.objectives.reward_model_loss`:
``mean −log σ(r_w − r_l − m) + η·mean (r_w + r_l)²`` — the Llama-2 margin ``m`` (arXiv 2307.09288,
eq. 2; the ``margin`` column, with ``use_margin``) and reward centring ``η`` (Eisenstein et al.,
arXiv 2312.09244, eq. 9; ``center_rewards_coefficient``). Each sequence is ``prompt + completion`` plus
EOS (when EOS is not the pad token), right-padded to ``max_prompt_length + max_completion_length``.

``prm`` — a process reward model (Uesato et al. 2022, arXiv 2211.14275, sec. 3; labels in the style of
Math-Shepherd, Wang et al. 2023, arXiv 2312.08935; TRL ``PRMTrainer``): token classification with 2
labels (0 incorrect, 1 correct) read at the last token of each step. Rows are ``(prompt, completions:
list of steps, labels: list of bool)``; each step is followed by ``step_separator`` and labelled on its
last token (the separator's last token), as TRL; ``train_on_last_step_only`` trains on each row's last
step only. Loss: :func:`trlax.objectives.process_reward_loss` (mean cross-entropy over labelled tokens).

Both export to ``<output_dir>/final`` a Hugging Face ``*ForSequenceClassification`` /
``*ForTokenClassification`` checkpoint (transformers ``AutoModelFor...`` loads it; so do
:func:`trlax.rollouts.load_reward_model` / :func:`~trlax.rollouts.load_process_reward_model`).

LoRA / DoRA (``lora_rank > 0``, ``use_dora``; as PEFT + TRL with ``modules_to_save=["score"]``): adapters
on the trunk's linear layers, the score head fully trained, the base weights frozen; the export is the
merged trunk + head, the same checkpoint as without LoRA.

Built-in data: the addition preference set (right sum chosen, a wrong one rejected; ``margin`` grows with
how far off the wrong sum is) and addition chains ``"3+4+2="`` -> steps ``["3+4=7", "7+2=9"]`` of which
half contain one corrupted result; a step is correct iff it and every step before it are right (Math-
Shepherd: no correct answer is reachable after an error).
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trlax.objectives._checks import check_range
from trlax.train import data as D
from trlax.train.loops import _host, _Run, eval_first_last, eval_records, first_last
from trlax.train.registry import TrainerSpec

_SMALL = dict(batch_size=32, learning_rate=1e-3, max_prompt_length=8)


# ------------------------------------------------------------------------------------ built-in data


def margin_preference_examples(n: int, seed: int = 0) -> List[Dict[str, Any]]:
    """The built-in preference set (:func:`trlax.train.data.preference_examples`) with a Llama-2 style
    ``margin`` column (arXiv 2307.09288, sec. 3.2.2: a larger margin for a clearer preference):
    ``|chosen − rejected|`` = 1 -> 0, 2 -> 1/3, 3-4 -> 2/3, >= 5 -> 1."""
    out = []
    for r in D.preference_examples(n, seed):
        gap = abs(int(r["chosen"]) - int(r["rejected"]))
        out.append(dict(r, margin=0.0 if gap <= 1 else 1 / 3 if gap == 2 else 2 / 3 if gap <= 4 else 1.0))
    return out


def step_examples(n: int, seed: int = 0, num_terms: int = 3) -> List[Dict[str, Any]]:
    """Addition chains with a label per step: ``{"prompt": "3+4+2=", "completions": ["3+4=7", "7+2=9"],
    "labels": [True, True]}``. Operands are digits whose partial sums stay <= 9; half of the chains get
    one step's result replaced by another digit (later steps carry the wrong value on), and that step and
    every later one are labelled False."""
    rng = random.Random(seed + 2)
    out = []
    while len(out) < n:
        terms = [rng.randint(0, 9) for _ in range(num_terms)]
        if sum(terms) > 9:
            continue
        bad = rng.randrange(num_terms - 1) if rng.random() < 0.5 else -1
        acc, steps, labels, ok = terms[0], [], [], True
        for i, t in enumerate(terms[1:]):
            res = acc + t
            if i == bad:
                res = rng.choice([d for d in range(10) if d != acc + t])
                ok = False
            steps.append(f"{acc}+{t}={res}")
            labels.append(ok)
            acc = res
        out.append({"prompt": "+".join(map(str, terms)) + "=", "completions": steps, "labels": labels})
    return out


# ------------------------------------------------------------------------------------------- runner


def _trainable(path, value) -> bool:
    """The LoRA run's trainable leaves: the trunk's adapters (``nnx.LoRAParam``) and the score head
    (PEFT's ``modules_to_save=["score"]``)."""
    return isinstance(value, nnx.LoRAParam) or path[0] in ("score", "score_bias")


class _ClassifierRun(_Run):
    """A :class:`~trlax.train.loops._Run` whose trainable tree is a classifier built from the run's
    decoder (``make_model(decoder) -> nnx.Module``; ``self.graphdef`` is its graph) and whose export writes
    it with ``save(model, path, tokenizer=)`` instead of the causal-LM ``policy.save``.

    With ``lora_rank > 0`` (PEFT + TRL ``RewardTrainer`` / ``PRMTrainer`` with a ``peft_config``): the
    classifier's trunk becomes a :class:`trlax.models.lora.LoraDecoder` (LoRA / DoRA adapters on its
    linear layers, arXiv 2106.09685 eq. 3 / 2402.09353 eq. 5, seeded like the policy's: ``seed + 1``); the
    trainable tree is the adapters plus the score head, the base weights ``self.frozen`` stay fixed (merged
    in at every forward), and the export folds the adapters into the trunk (:func:`trlax.models.merge_lora`):
    the same Hugging Face checkpoint as a full fine-tune."""

    def __init__(self, algo, cfg, loss_builder, make_model, save):
        from trlax.models.lora import LoraDecoder, adapters_off
        from trlax.models.sharding import param_shardings, sharding_rules
        from trlax.train.modeling import lora_config_of

        self._save, self.frozen = save, None
        lcfg = lora_config_of(cfg)

        def params_fn(policy):
            model = make_model(adapters_off(policy.model()))  # LoRA policy: its base decoder
            if lcfg is None:
                self.graphdef, params = nnx.split(model)
                return params
            model.backbone = LoraDecoder(model.backbone, lcfg, rngs=nnx.Rngs(cfg.seed + 1))
            self.graphdef, params, frozen = nnx.split(model, _trainable, ...)
            self.frozen = jax.device_put(frozen, param_shardings(frozen, self.mesh, sharding_rules("fsdp_tp")))
            return params

        super().__init__(algo, cfg, loss_builder, params_fn=params_fn)

    def model(self, params):
        """The classifier for trainable ``params`` (with LoRA: adapters + head, merged with the frozen base)."""
        return nnx.merge(self.graphdef, params) if self.frozen is None else nnx.merge(self.graphdef, params,
                                                                                        self.frozen)

    def export(self, params, path: str) -> None:
        from trlax.models.lora import merge_lora

        params = jax.tree_util.tree_map(_host, params)  # collective on multi-host
        if self.is_main:
            model = self.model(jax.device_get(params))
            if self.frozen is not None:
                model.backbone = merge_lora(model.backbone)
            self._save(model, path, tokenizer=self.tokenizer)


def _join(tok, prompt, completion) -> str:
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational: one template
        return tok.apply_chat_template(prompt + completion, tokenize=False)
    return D.as_text(tok, prompt) + D.as_text(tok, completion)


def _finish(run, cfg, algo: str, metric: str, extra: Dict[str, Any], eval_rows=None,
            eval_keys=()) -> Dict[str, Any]:
    hist = run.logger.history
    first, last = first_last([r["loss"] for r in hist])
    m_first, m_last = first_last([r.get(metric, np.nan) for r in hist])
    line = f"mean loss: first 10% of steps {first:.4f} -> last 10% {last:.4f}; {metric} {m_first:.3f} -> {m_last:.3f}"
    out = {"algorithm": algo, "steps": cfg.max_steps, "loss_first_10pct": first, "loss_last_10pct": last,
           f"{metric}_first_10pct": m_first, f"{metric}_last_10pct": m_last, **extra}
    if eval_rows is not None:  # eval_<key>_first / _last, as the preference trainers
        for key in eval_keys:
            out[f"eval_{key}_first"], out[f"eval_{key}_last"] = eval_first_last(run, key)
        line += f"; held-out ({len(eval_rows)} rows) " + ", ".join(
            f"{key} {out[f'eval_{key}_first']:.3f} -> {out[f'eval_{key}_last']:.3f}" for key in eval_keys)
    print(line)
    return run.finish(out)


def _maybe_eval(run, evaluate, eval_rows, step: int) -> None:
    """Evaluate before the first step of a fresh run (``step`` 0) and when due (``eval_steps``, last step)."""
    if eval_rows is not None and (run.due_eval(step, step - 1) if step else run.start_step == 0):
        evaluate(step)


def run_reward(cfg, rows=None, algo: str = "reward") -> Dict[str, Any]:
    """Bradley-Terry reward model (arXiv 2203.02155, eq. 1; margin arXiv 2307.09288, eq. 2; centring
    arXiv 2312.09244, eq. 9); see the module docstring. Held-out evaluation (``eval_dataset`` / ``eval_split``):
    the pairwise accuracy (fraction of pairs with ``r(chosen) > r(rejected)``), the mean margin
    ``r(chosen) − r(rejected)``, the mean reward and the objective's loss over the held-out pairs: each pair
    scored once, in batches of ``batch_size`` pairs (the training batch's shapes; the last batch filled up from
    the start and the repeats dropped), then :func:`~trlax.objectives.reward_model_loss` on all the scores (an
    exact mean over the pairs: the objective's batch means cannot leave out a batch's repeated rows)."""
    from trlax.objectives.unpaired import reward_model_loss
    from trlax.rollouts.reward_model import classifier_from_decoder, save_reward_model

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = eval_records(algo, cfg, rows)
    for name, sel in (("dataset", rows), ("eval_dataset", eval_rows)):
        if cfg.use_margin and sel is not None and "margin" not in sel[0]:
            raise ValueError(f"use_margin=True but {name}={getattr(cfg, name)!r} has no 'margin' column")
    eta = cfg.center_rewards_coefficient

    def loss_builder(run):
        def loss_fn(params, b, totals):
            n = b["chosen_ids"].shape[0]
            ids = jnp.concatenate([b["chosen_ids"], b["rejected_ids"]], 0)
            mask = jnp.concatenate([b["chosen_mask"], b["rejected_mask"]], 0)
            r = run.model(params)(ids, mask)[:, 0]
            loss, metrics = reward_model_loss(r[:n], r[n:], margin=b.get("margin"), center_rewards_coefficient=eta)
            return loss * (n / totals["num_sequences"]), metrics  # this micro-batch's share of the batch mean
        return loss_fn

    run = _ClassifierRun(algo, cfg, loss_builder, lambda dec: classifier_from_decoder(dec, 1, seed=cfg.seed),
                         save_reward_model)
    tok = run.tokenizer
    L = cfg.max_prompt_length + cfg.max_completion_length
    add_eos = tok.eos_token_id != tok.pad_token_id  # else transformers would score the token before EOS

    def encode(sel):
        out = {}
        for col in ("chosen", "rejected"):
            out[f"{col}_ids"], out[f"{col}_mask"] = D.encode_right_padded(
                tok, [_join(tok, r["prompt"], r[col]) for r in sel], L, add_eos)
        if cfg.use_margin:
            out["margin"] = np.asarray([float(r["margin"]) for r in sel], np.float32)
        return out

    table = encode(rows)  # every training pair, tokenised once
    if eval_rows is not None:
        from trlax.objectives.aggregation import finalize_metrics

        held = encode(eval_rows)
        score = jax.jit(lambda p, ids, mask: run.model(p)(ids, mask)[:, 0])

        @jax.jit
        def objective(rw, rl, mg):  # the training objective and its metrics on all the held-out scores
            loss, metrics = reward_model_loss(rw, rl, margin=mg, center_rewards_coefficient=eta)
            return dict(finalize_metrics(metrics), loss=loss)

    def evaluate(step):  # held-out pairwise accuracy, margin, mean reward and loss
        n, bs, rs = len(eval_rows), cfg.batch_size, []
        for i in range(0, n, bs):
            idx = np.arange(i, i + bs) % n
            r = _host(score(run.state.params, np.concatenate([held["chosen_ids"][idx], held["rejected_ids"][idx]]),
                            np.concatenate([held["chosen_mask"][idx], held["rejected_mask"][idx]])))
            rs.append(r.reshape(2, bs)[:, :min(bs, n - i)])
        rw, rl = np.concatenate(rs, axis=1)
        m = objective(rw, rl, held.get("margin"))
        run.logger.log_eval(step, {k: float(_host(m[k])) for k in ("accuracy", "margin", "reward/mean", "loss")})

    _maybe_eval(run, evaluate, eval_rows, 0)
    sampler = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = sampler.next()
        batch = {k: v[idx] for k, v in table.items()}
        m = run.train_step(batch)
        run.logger.log(step, m, tokens=int(batch["chosen_mask"].sum() + batch["rejected_mask"].sum()))
        _maybe_eval(run, evaluate, eval_rows, step)
        run.maybe_checkpoint(step, {"data": sampler.state()})
    return _finish(run, cfg, algo, "accuracy", {"use_margin": cfg.use_margin, "center_rewards_coefficient": eta},
                   eval_rows, ("accuracy", "margin", "loss"))


def encode_steps(tok, rows, max_prompt_length: int, max_completion_length: int, step_separator: str,
                 last_step_only: bool = False):
    """TRL ``PRMTrainer`` tokenisation: ``prompt[-P:] + (step_1 + sep) + (step_2 + sep) + ...`` (the
    completion cut to its first ``C`` tokens), right-padded to ``P + C``. Returns ``(ids, attention_mask,
    labels, mask)``, each ``[N, P + C]``: ``labels`` is 0 / 1 on the last token of every step and -100
    elsewhere; ``mask`` marks the trained label positions (every step, or each row's last step)."""
    P, C = max_prompt_length, max_completion_length
    sep = tok(step_separator, add_special_tokens=False)["input_ids"]
    if not sep:
        raise ValueError(f"step_separator={step_separator!r} tokenises to nothing")
    n = len(rows)
    ids = np.full((n, P + C), tok.pad_token_id, np.int32)
    att = np.zeros((n, P + C), bool)
    labels = np.full((n, P + C), -100, np.int32)
    for i, r in enumerate(rows):
        steps, labs = list(r["completions"]), list(r["labels"])
        if len(steps) != len(labs):
            raise ValueError(f"row {i}: {len(steps)} completions but {len(labs)} labels")
        p = tok(D.as_text(tok, r["prompt"]), add_special_tokens=False)["input_ids"][-P:]
        c, lab = [], []
        for s, y in zip(steps, labs):
            t = tok(s, add_special_tokens=False)["input_ids"] + sep
            c += t
            lab += [-100] * (len(t) - 1) + [int(bool(y))]
        c, lab = c[:C], lab[:C]
        seq, seq_lab = p + c, [-100] * len(p) + lab
        ids[i, :len(seq)], att[i, :len(seq)], labels[i, :len(seq)] = seq, True, seq_lab
    mask = labels >= 0
    if last_step_only:
        pos = np.arange(P + C)
        last = np.max(np.where(mask, pos, -1), axis=1, keepdims=True)
        mask = mask & (pos == last)
    return ids, att, labels, mask


def run_prm(cfg, rows=None, algo: str = "prm") -> Dict[str, Any]:
    """Process reward model (arXiv 2211.14275, sec. 3; TRL ``PRMTrainer``); see the module docstring.
    Held-out evaluation (``eval_dataset`` / ``eval_split``): the step-label accuracy and the loss over the
    held-out rows' labelled positions (those trained on: every step, or the last with
    ``train_on_last_step_only``), in batches of ``batch_size`` rows at the training batch's shapes, each batch
    weighted by its labelled positions (a token mean over the whole held-out set)."""
    from trlax.objectives.unpaired import process_reward_loss
    from trlax.rollouts.reward_model import classifier_from_decoder, save_process_reward_model

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = eval_records(algo, cfg, rows)

    def loss_builder(run):
        def loss_fn(params, b, totals):
            logits = run.model(params)(b["input_ids"], b["attention_mask"])
            return process_reward_loss(logits, b["labels"], b["mask"], last_step_only=cfg.train_on_last_step_only,
                                       num_items=totals["num_items"])
        return loss_fn

    run = _ClassifierRun(algo, cfg, loss_builder,
                         lambda dec: classifier_from_decoder(dec, 2, seed=cfg.seed, kind="token"),
                         save_process_reward_model)
    ids, att, labels, mask = encode_steps(run.tokenizer, rows, cfg.max_prompt_length, cfg.max_completion_length,
                                          cfg.step_separator, cfg.train_on_last_step_only)
    if not mask.any():
        raise ValueError(f"dataset={cfg.dataset!r}: no step label survives max_prompt_length + "
                         f"max_completion_length = {ids.shape[1]} tokens")
    if eval_rows is not None:
        ev = dict(zip(("input_ids", "attention_mask", "labels", "mask"), encode_steps(
            run.tokenizer, eval_rows, cfg.max_prompt_length, cfg.max_completion_length, cfg.step_separator,
            cfg.train_on_last_step_only)))

    def evaluate(step):
        # run.eval_batches weights each batch by its rows; the loss and accuracy are means over labelled
        # positions, so here each batch (the last one filled up from the start, the repeats' labels masked out)
        # is weighted by its labelled positions: exact token means over the held-out set
        n, bs = len(eval_rows), cfg.batch_size
        sums, count = {"loss": 0.0, "accuracy": 0.0}, 0.0
        for i in range(0, n, bs):
            b = {k: v[np.arange(i, i + bs) % n] for k, v in ev.items()}
            b["mask"][min(bs, n - i):] = False
            w = float(b["mask"].sum())
            if w:
                m = run.eval_loss(b)
                count += w
                for k in sums:
                    sums[k] += w * m[k]
        run.logger.log_eval(step, {k: v / count if count else float("nan") for k, v in sums.items()})

    _maybe_eval(run, evaluate, eval_rows, 0)
    sampler = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = sampler.next()
        batch = {"input_ids": ids[idx], "attention_mask": att[idx], "labels": labels[idx], "mask": mask[idx]}
        m = run.train_step(batch)
        run.logger.log(step, m, tokens=int(att[idx].sum()))
        _maybe_eval(run, evaluate, eval_rows, step)
        run.maybe_checkpoint(step, {"data": sampler.state()})
    return _finish(run, cfg, algo, "accuracy", {"train_on_last_step_only": cfg.train_on_last_step_only},
                   eval_rows, ("accuracy", "loss"))


# ------------------------------------------------------------------------------------------- configs


def _validate_reward(self) -> None:
    check_range("center_rewards_coefficient", self.center_rewards_coefficient, low=0.0, allow_none=True)
    if not isinstance(self.use_margin, bool):
        raise ValueError(f"use_margin={self.use_margin!r} must be a boolean")


def _validate_prm(self) -> None:
    if not isinstance(self.step_separator, str) or not self.step_separator:
        raise ValueError(f"step_separator={self.step_separator!r} must be a non-empty string")
    if not isinstance(self.train_on_last_step_only, bool):
        raise ValueError(f"train_on_last_step_only={self.train_on_last_step_only!r} must be a boolean")


def _reward_cls():
    from trlax.train.config import make_run_config

    return make_run_config(
        "reward",
        [("preset", str, ""), ("use_margin", bool, False),  # read the dataset's `margin` column (Llama 2)
         ("center_rewards_coefficient", Optional[float], None)],  # η of arXiv 2312.09244 (None: off)
        defaults=dict(_SMALL, max_steps=150, max_completion_length=4), validate=_validate_reward,
        doc="trlax train reward: Bradley-Terry reward model (scalar head on the decoder).")


def _prm_cls():
    from trlax.train.config import make_run_config

    return make_run_config(
        "prm",
        [("preset", str, ""), ("step_separator", str, "\n"), ("train_on_last_step_only", bool, False)],
        defaults=dict(_SMALL, max_steps=300, max_completion_length=16), validate=_validate_prm,
        doc="trlax train prm: process reward model (token classification at step ends).")


SPECS = [
    TrainerSpec("reward", _reward_cls, run_reward, ("prompt", "chosen", "rejected"), margin_preference_examples,
                presets={"reward": {}, "reward_margin": {"use_margin": True}, "llama2": {"use_margin": True},
                         "reward_center": {"center_rewards_coefficient": 0.01}},
                metric="accuracy",
                description="Bradley-Terry reward model (InstructGPT); Llama-2 margin, reward centring"),
    TrainerSpec("prm", _prm_cls, run_prm, ("prompt", "completions", "labels"), step_examples,
                presets={"prm": {"train_on_last_step_only": False}, "prm_last": {"train_on_last_step_only": True}},
                metric="accuracy", description="process reward model: step-level token classification"),
]

__all__ = ["SPECS", "encode_steps", "margin_preference_examples", "run_prm", "run_reward", "step_examples"]
