"""``imgrag eval``: arms on the same prompts and seeds, scored by models the agent never selects with.

Two ways to give the prompts:

- ``--classes DIR`` (ImageRAG's protocol, Shalev-Arkushin et al., arXiv 2502.09411): one folder per class
  (:mod:`imgrag.scoring.class_folders`). Each class is split with a fixed seed into retrieval and gold pictures; the
  retrieval pictures are indexed into a store of the evaluation's own (``<eval>/store``), which is checked to
  hold no gold picture; each class is drawn from the prompt ``prompts/eval_class.md`` ("a photo of a <class>"),
  and every drawing is scored against that class's gold pictures.
- a prompt file (``.txt`` / ``.jsonl`` with optional ``gold``): the profile's store is used, and every gold
  picture (by path, and by content wherever the store holds a copy) is added to ``safety.exclude`` for these
  runs, so no arm can retrieve it.

Each prompt runs through every arm (:mod:`agent.eval_arms`: plain SDXL, ImageRAG's single pass, imgrag's loop
with the fixed and the agent planner) on the same seed, in one process (each model loads once, before timing).
The answers are scored (:mod:`imgrag.scoring.scorers`): DINO image-image and CLIP image-image against the gold pictures,
SigLIP and CLIP text-image against the prompt, and the judge's match. The loop selects its answer by the judge's
match, then CLIP text-image, so those two columns are marked as the agent's own yardstick; the headline is DINO
and SigLIP. Per metric and arm, the paired differences against plain give a mean with a bootstrap 95 % interval
and the shares of prompts improved and worsened (:mod:`imgrag.scoring.paired_stats`).

Every run records what it retrieved; after the arms, the records are checked against the gold pictures (by path
and content), and a run that saw one makes the evaluation fail with one line.

It writes ``<output_dir>/eval-<name>-<time>/``: ``eval.json`` (every number), ``eval.csv`` (one row per prompt
and arm), ``report.html``, and one folder per arm that is not a loop run (the loop runs are ordinary run folders
beside it). This lives in ``agent/`` because it drives the agent's runner.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import prompts
from agent.eval_arms import ARM_MODELS, ARMS, ArmContext, ArmResult, EvalItem
from agent.eval_inputs import read_eval_file
from agent.runner import PLANNERS, Runner
from imgrag.atomic_files import write_json_atomic
from imgrag.errors import UserError
from imgrag.file_names import display_name
from imgrag.management.engine import ManagedEmbedder, register_omnigen
from imgrag.models.dino import DinoScorer  # noqa: F401  (its old home; imported from here by callers)
from imgrag.records.report import write_report
from imgrag.scoring.class_folders import read_class_folder, split_classes
from imgrag.scoring.scorers import Scorers, scorer_names
from imgrag.scoring.summary import BASELINE, METRICS, per_arm, summarise, write_csv
from imgrag.settings import TINY_WARNING, Settings
from imgrag.store import ReferenceStore
from imgrag.store.indexing import ID_HEX_CHARS
from imgrag.store.walking import content_digest
from imgrag.text import describe_error
from tools.budget import check_rounds

DEFAULT_ARMS = ("plain", "imagerag", "loop-fixed", "loop-agent")
# The arms that need no LLM (`--planner fixed`: a 24 GB card, or no LLM at all).
FIXED_ARMS = ("plain", "imagerag", "loop-fixed")
# ImageRAG-O's arms, added to the defaults by `--repair-with omnigen` (or named in --arms).
OMNIGEN_ARMS = ("plain-omnigen", "imagerag-o")
TINY_EVAL_NOTE = TINY_WARNING + " Every number below is plumbing, not a measurement: the scores are of noise."


def class_prompt(settings: Settings, class_name: str) -> str:
    """The prompt for a class: ``eval.prompt_template`` or ``prompts/eval_class.md``, ``{class_name}`` filled."""
    template = settings.eval.prompt_template.strip()
    if not template:
        return prompts.render("eval_class", class_name=class_name).strip()
    try:
        return template.format(class_name=class_name).strip()
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"eval.prompt_template {template!r} may hold only {{class_name}}: {exc}") from None


def class_items(settings: Settings, splits: list[Any]) -> list[EvalItem]:
    """``eval.prompts_per_class`` items per class, on seeds ``generation.seed``, +1, ... (the same for every
    class, so a class's prompts differ only by seed)."""
    items = []
    for split in splits:
        prompt = class_prompt(settings, split.name)
        for n in range(settings.eval.prompts_per_class):
            items.append(EvalItem(len(items), prompt, settings.generation.seed + n, list(split.gold), split.folder))
    return items


def default_arms(planner: str | None, settings: Settings) -> list[str]:
    """The arms run when ``--arms`` is not given: every arm, or only the LLM-free ones for ``planner == "fixed"``;
    with ``generation.repair_with = "omnigen"``, ImageRAG-O's pass and its OmniGen baseline after SDXL's."""
    arms = list(FIXED_ARMS if planner == "fixed" else DEFAULT_ARMS)
    if settings.generation.repair_with == "omnigen":
        arms[2:2] = OMNIGEN_ARMS
    return arms


def choose_arms(arms: list[str] | tuple[str, ...] | None, planner: str | None, settings: Settings) -> list[str]:
    """The arms an evaluation runs: ``arms`` (``--arms``) checked, else :func:`default_arms`. ``planner == "fixed"``
    means no LLM, so naming an arm that needs one beside it contradicts it: a UserError, before any model loads."""
    if arms is None:
        return check_arms(default_arms(planner, settings))
    chosen = check_arms(arms)
    needs_llm = [arm for arm in chosen if "llm" in ARM_MODELS.get(arm, ())]
    if planner == "fixed" and needs_llm:
        raise UserError(f"--planner fixed runs only the arms that need no LLM, and {', '.join(needs_llm)} "
                        f"need{'s' if len(needs_llm) == 1 else ''} it: drop {'it' if len(needs_llm) == 1 else 'them'} "
                        "from --arms, or drop --planner fixed")
    return chosen


def check_arms(arms: list[str] | tuple[str, ...]) -> list[str]:
    """The arms asked for, in order, plain first; a UserError naming the known ones otherwise."""
    arms = list(dict.fromkeys(a.strip() for a in arms if a.strip()))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    if BASELINE not in arms:
        arms.insert(0, BASELINE)  # every difference is against plain generation
    return [BASELINE] + [a for a in arms if a != BASELINE]


def read_splits(settings: Settings, folder: str | Path,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> list[Any]:
    """The class folder read and split by the ``eval.*`` settings (:func:`imgrag.scoring.class_folders.split_classes`);
    each file that cannot be read as a picture is a ``note`` event (``skipped PATH: reason``, as ``imgrag index``
    says it) as it is found, so a class refused for too few pictures is seen with the files that were unreadable."""
    e = settings.eval

    def skipped(path: str, reason: str) -> None:
        if on_event is not None:
            on_event({"event": "note", "text": f"skipped {display_name(path)}: {reason}"})

    return split_classes(read_class_folder(folder), gold_per_class=e.gold_per_class,
                         retrieval_per_class=e.retrieval_per_class, seed=e.split_seed, on_skip=skipped)


def cosine(a: Any, b: Any) -> float:
    """Cosine of two vectors (the embedders' rows are unit length already; normalising again is cheap
    and keeps this right for any scorer)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else 0.0


# ----------------------------------------------------------------------------------------------
# Gold pictures: kept out of retrieval, checked in the records
# ----------------------------------------------------------------------------------------------

class GoldSet:
    """The gold pictures of an evaluation, known by resolved path and by store id (content hash)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = sorted({str(Path(p).resolve()) for p in paths})
        self.ids = {content_digest(Path(p).read_bytes())[:ID_HEX_CHARS]: p for p in self.paths}

    def seen_in(self, retrieved: list[dict[str, str]]) -> list[str]:
        """The gold pictures among ``retrieved`` (``{"id", "path"}``), by id or resolved path."""
        hits = []
        for ref in retrieved:
            path = ref.get("path") or ""
            resolved = str(Path(path).resolve()) if path else ""
            if ref.get("id") in self.ids or resolved in self.paths:
                hits.append(path or self.ids[ref["id"]])
        return hits


def exclusion_patterns(paths: list[str]) -> list[str]:
    """``safety.exclude`` entries that match exactly these files: literal paths (an entry is a glob only with
    ``glob:``), so a name with ``[`` or ``*`` in it means itself."""
    return list(paths)


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------

class Evaluation:
    """Runs prompts through every arm and writes the eval folder (see the module docstring)."""

    def __init__(self, settings: Settings, *, manager: Any = None, runner: Runner | None = None,
                 planner: str | None = None, arms: list[str] | tuple[str, ...] | None = None,
                 max_rounds: int | None = None, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        if planner is not None and planner not in PLANNERS:
            raise UserError(f"unknown planner {planner!r} (use {' or '.join(PLANNERS)})")
        check_rounds(max_rounds)
        self.arms = choose_arms(arms, planner, settings)
        self.settings = settings
        self.on_event = on_event or (lambda event: None)
        if runner is None:
            runner = Runner(settings, manager=manager, on_event=self.on_event)
        self.runner = runner
        self.manager = runner.manager  # one manager for every arm and every score
        if any("omnigen" in ARM_MODELS.get(arm, ()) for arm in self.arms) and "omnigen" not in self.manager.names():
            register_omnigen(self.manager, settings)
        self.max_rounds = max_rounds

    # ----- the two modes -----
    def run(self, path: str | Path, *, limit: int | None = None, items: list[dict[str, Any]] | None = None,
            on_item: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Evaluate the first ``limit`` prompts of a prompt file (``items``: its :func:`read_eval_file`, when the
        caller has read it already); return eval.json's document. Gold pictures are excluded from retrieval."""
        path = Path(path)
        raw = read_eval_file(path) if items is None else items
        raw = raw[:_limit(limit, len(raw))]
        seed = self.settings.generation.seed
        todo = [EvalItem(i, it["prompt"], seed if it.get("seed") is None else int(it["seed"]),
                         [it["gold"]] if it.get("gold") else [], None, it.get("max_rounds"))
                for i, it in enumerate(raw)]
        gold = GoldSet([p for it in todo for p in it.gold])
        eval_dir = self._new_dir(path.stem)
        store = self._open_store()
        exclude = list(gold.paths)
        copies = getattr(store, "paths_of", None)  # the same picture stored under other paths
        if callable(copies) and gold.ids:
            exclude += [p for paths in copies(list(gold.ids)).values() for p in paths]
        settings = dataclasses.replace(self.settings, safety=dataclasses.replace(
            self.settings.safety, exclude=[*self.settings.safety.exclude, *exclusion_patterns(sorted(set(exclude)))]))
        info = {"mode": "prompts", "source": str(path), "store": {"location": _location(store, self.settings),
                                                                  "gold_excluded": sorted(set(exclude))}}
        return self._evaluate(eval_dir, todo, settings, store, gold, info, on_item)

    def run_classes(self, folder: str | Path, *, limit: int | None = None, splits: list[Any] | None = None,
                    on_item: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """ImageRAG's protocol on a folder per class (see the module docstring); return eval.json's document.
        ``splits``: the folder's :func:`read_splits`, when the caller has made them already (its notes said)."""
        e = self.settings.eval
        splits = read_splits(self.settings, folder, self.on_event) if splits is None else splits
        todo = class_items(self.settings, splits)
        todo = todo[:_limit(limit, len(todo))]
        gold = GoldSet([p for s in splits for p in s.gold])
        eval_dir = self._new_dir(Path(folder).resolve().name)
        settings = dataclasses.replace(self.settings, store=str(eval_dir / "store"))
        store = self._index_retrieval(settings, [p for s in splits for p in s.retrieval])
        stored = _stored_ids(store)
        if stored is not None and stored & set(gold.ids):  # cannot happen with the split; checked all the same
            raise UserError(f"the evaluation store {settings.store} holds gold pictures "
                            f"({', '.join(gold.ids[i] for i in sorted(stored & set(gold.ids)))}); refusing to run")
        info = {"mode": "classes", "source": str(Path(folder).resolve()),
                "split": {"seed": e.split_seed, "gold_per_class": e.gold_per_class,
                          "retrieval_per_class": e.retrieval_per_class, "prompts_per_class": e.prompts_per_class,
                          "classes": [{"folder": s.folder, "name": s.name, "gold": s.gold,
                                       "retrieval": len(s.retrieval), "skipped": s.skipped} for s in splits]},
                "store": {"location": settings.store, "pictures": store.count(), "gold_in_store": 0}}
        return self._evaluate(eval_dir, todo, settings, store, gold, info, on_item)

    # ----- shared steps -----
    def _new_dir(self, name: str) -> Path:
        base = Path(self.settings.output_dir) / f"eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        eval_dir, n = base, 1
        while eval_dir.exists():  # two evaluations of one source in the same second
            n += 1
            eval_dir = base.with_name(f"{base.name}-{n}")
        eval_dir.mkdir(parents=True)
        # From here on something is on disk: a front-end says what Ctrl-C keeps (the folder, not a resumable state).
        self.on_event({"event": "eval_dir", "eval_dir": str(eval_dir)})
        return eval_dir

    def _open_store(self) -> Any:
        """The store the prompt-file mode's runs retrieve from (None when retrieval is unavailable)."""
        if self.runner.check_retrieval() is not None:
            return None
        return self.runner.reference_store

    def _index_retrieval(self, settings: Settings, paths: list[str]) -> Any:
        """Index the retrieval pictures into the evaluation's own store; the runner retrieves from it."""
        embedder = ManagedEmbedder(self.manager)
        self.on_event({"event": "note", "text": f"indexing {len(paths)} retrieval pictures into {settings.store}"})
        store = ReferenceStore.open(settings, embedder.model_id, embedder.dim, for_writing=True)
        store.index(paths, embedder)
        self.runner.reference_store = store
        return store

    def _evaluate(self, eval_dir: Path, items: list[EvalItem], settings: Settings, store: Any, gold: GoldSet,
                  info: dict[str, Any], on_item: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        original = self.runner.settings
        # The loop runs see the gold exclusion and the eval's store, and no concept memory: each prompt is measured
        # on its own, never helped by what an earlier prompt of the evaluation taught.
        settings = dataclasses.replace(settings, retrieval=dataclasses.replace(settings.retrieval, memory=False))
        self.runner.settings = settings
        try:
            load_seconds = self._load_models()
            ctx = ArmContext(settings, self.manager, self.runner, store, eval_dir, self.max_rounds)
            start = time.perf_counter()
            records = []
            for item in items:
                record = self._one(ctx, item)
                records.append(record)
                if on_item:
                    on_item(record)
            seen = [(r["index"], arm, path) for r in records for arm, res in r["arms"].items()
                    for path in gold.seen_in(res.get("retrieved") or [])]
            scorers = Scorers(settings, self.manager)
            scoring_start = time.perf_counter()
            for record in records:
                _score(scorers, record)
            scoring_seconds = round(time.perf_counter() - scoring_start, 3)
            for path, why in sorted(scorers.skipped.items()):  # named as the split names what it could not read
                self.on_event({"event": "note", "text": f"gold picture {display_name(path)} could not be decoded "
                                                        f"({why}); it is left out of the scores"})
        finally:
            self.runner.settings = original
        doc = {
            "eval_dir": str(eval_dir), **info, "profile": settings.profile,
            "arms": self.arms, "baseline": BASELINE,
            "max_rounds": self.max_rounds or settings.budget.max_rounds,
            "metrics": [{**dataclasses.asdict(m), "column": m.column} for m in METRICS],
            "agent_selects_with": [m.key for m in METRICS if m.agent_selects_with],
            # Gold pictures that passed the split's header check but could not be decoded: left out of the scores.
            "gold_unreadable": [{"path": path, "reason": why} for path, why in sorted(scorers.skipped.items())],
            "scorers": scorer_names(settings),
            "generator": settings.models.generator, "judge": settings.models.judge,
            "items": records,
            "summary": summarise(records, self.arms, seed=settings.eval.bootstrap_seed),
            "per_arm": per_arm(records, self.arms),
            "gold_retrieved": [{"index": i, "arm": arm, "path": path} for i, arm, path in seen],
            "model_loads": self.manager.load_counts(), "model_load_seconds": load_seconds,
            "seconds": round(time.perf_counter() - start, 3), "seconds_scoring": scoring_seconds,
        }
        if settings.is_tiny:
            doc["note"] = TINY_EVAL_NOTE
        write_json_atomic(eval_dir / "eval.json", doc)
        write_csv(eval_dir / "eval.csv", doc)
        write_report(eval_dir)
        if seen:
            index, arm, path = seen[0]
            raise UserError(f"prompt {index + 1}, arm {arm} retrieved the gold picture {path}: this evaluation is "
                            f"invalid (see {eval_dir / 'eval.json'}, gold_retrieved)")
        return doc

    def _load_models(self) -> dict[str, float]:
        """Load every model the arms use before timing anything, so the first prompt does not carry the loads
        (reported apart, in seconds per model)."""
        names = ["generator", "judge", "embedder"]
        names += [m for arm in self.arms for m in ARM_MODELS.get(arm, ()) if m not in names]
        if "llm" in names:
            self.runner.check_llm()
        seconds = {}
        for name in names:
            start = time.perf_counter()
            self.manager.run(name, lambda model: None)
            seconds[name] = round(time.perf_counter() - start, 3)
        return seconds

    def _one(self, ctx: ArmContext, item: EvalItem) -> dict[str, Any]:
        """Every arm on one item; an arm that fails is recorded and the others go on."""
        self.on_event({"event": "eval_item", "index": item.index, "prompt": item.prompt})
        record: dict[str, Any] = {"index": item.index, "prompt": item.prompt, "seed": item.seed,
                                  "class": item.class_folder, "gold": item.gold, "arms": {}}
        for arm in self.arms:
            self.on_event({"event": "eval_arm", "index": item.index, "arm": arm})
            try:
                result = ARMS[arm](ctx, item)
            except Exception as exc:  # one broken arm or prompt must not stop the evaluation; the error is kept
                result = ArmResult(arm, error=describe_error(exc))
            record["arms"][arm] = result.to_dict()
        errors = [f"{arm}: {r['error']}" for arm, r in record["arms"].items() if r.get("error")]
        record["error"] = "; ".join(errors) or None
        return record


def _score(scorers: Any, record: dict[str, Any]) -> None:
    """Every arm's answer of one prompt scored into its ``scores``; a scoring failure is the prompt's error."""
    arms = record["arms"]
    images = {arm: r["image"] for arm, r in arms.items() if r.get("image")}
    try:
        scores = scorers.score(record["prompt"], images, record["gold"], {a: arms[a].get("verdict") for a in images})
    except Exception as exc:  # a scorer that cannot load or run: the pictures are kept, the scores left empty
        record["error"] = "; ".join(filter(None, [record.get("error"), f"scoring: {describe_error(exc)}"]))
        return
    for arm, values in scores.items():
        verdict = values.pop("verdict", None)
        if verdict is not None:
            arms[arm]["verdict"] = verdict
        arms[arm]["scores"].update(values)


def _limit(limit: int | None, total: int) -> int:
    if limit is None:
        return total
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    return limit


def _location(store: Any, settings: Settings) -> str:
    return str(getattr(store, "location", None) or settings.store)


def _stored_ids(store: Any) -> set[str] | None:
    ids = getattr(store, "ids", None)
    return set(ids()) if callable(ids) else None
