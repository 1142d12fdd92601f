"""The reference store: indexing (incremental, idempotent, crash-safe), search, retrieval maths, backends.

Ranking and retrieval are checked with a colour embedder whose vectors we control; the plumbing end to
end with the tiny kit's random-weight open_clip model (its rankings mean nothing; self-matches do).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgrag.store.client as client_mod
import imgrag.store.indexing as indexing_mod
from imgrag.errors import UserError
from imgrag.settings import load_settings
from imgrag.store import (
    ReferenceStore,
    collection_name,
    rank_references,
    reflective_scores,
    walk_images,
)
from tests.ports import ServerDidNotStart, free_port, start_server, stop

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

class ColourEmbedder:
    """Controlled vectors: a picture is its mean colour (r, g, b, small constant); colour words are axes."""

    dim = 4
    TEXTS = {"red": [1, 0, 0, 0], "green": [0, 1, 0, 0], "blue": [0, 0, 1, 0], "yellow": [1, 1, 0, 0]}

    def __init__(self, model_id: str = "colour-v1") -> None:
        self.model_id = model_id
        self.image_calls = 0

    def embed_images(self, images, batch_size: int = 32) -> np.ndarray:
        self.image_calls += len(images)
        rows = [np.append(np.asarray(im.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)), 8.0) for im in images]
        return _unit(np.array(rows).reshape(len(images), 4))

    def embed_texts(self, texts) -> np.ndarray:
        return _unit(np.array([self.TEXTS[t] for t in texts], dtype=np.float64).reshape(len(texts), 4))


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def solid(path: Path, rgb: tuple[int, int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path


def noise(path: Path, seed: int, size: int = 16, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height, with one tiny (wrong-sized) data chunk: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def settings_for(store: Path | str, profile: str = "default"):
    return load_settings(profile, overrides={"store": str(store)})


def open_store(tmp_path: Path, embedder, for_writing: bool = True) -> ReferenceStore:
    return ReferenceStore.open(settings_for(tmp_path / "store"), embedder.model_id, embedder.dim,
                               for_writing=for_writing)


def all_entries(store: ReferenceStore) -> dict[str, dict]:
    got = store._collection.get(include=["metadatas"])
    return dict(zip(got["ids"], got["metadatas"], strict=True))


def paths_per_entry(store: ReferenceStore) -> dict[str, list[str]]:
    return {i: sorted(json.loads(m["paths"])) for i, m in all_entries(store).items()}


@pytest.fixture
def colours(tmp_path: Path) -> Path:
    folder = tmp_path / "pics"
    solid(folder / "red.png", (255, 0, 0))
    solid(folder / "green.png", (0, 255, 0))
    solid(folder / "blue.png", (0, 0, 255))
    solid(folder / "nested" / "deeper" / "yellow.png", (255, 255, 0))
    solid(folder / "orange.jpg", (255, 120, 0))
    return folder


@pytest.fixture(scope="module")
def clip(tiny_kit):
    """The tiny kit's open_clip embedder, loaded once for this module."""
    from imgrag.models.embedder import Embedder

    settings = load_settings("tiny", environ={"IMGRAG_TINY_KIT_DIR": str(tiny_kit["embedder"].parent),
                                              "IMGRAG_DEVICE": "cpu"})
    return Embedder.from_pretrained(settings)


# ----------------------------------------------------------------------------------------------
# ranking maths on constructed vectors
# ----------------------------------------------------------------------------------------------

def test_reflective_rerank_prefers_refs_unlike_the_candidate() -> None:
    # One query; ref 0 is the most relevant but looks like the failed candidate, ref 1 slightly less
    # relevant and unlike it, ref 2 irrelevant.
    sims = np.array([[0.90, 0.80, 0.10]])
    avoid = np.array([0.95, 0.10, 0.00])
    assert [p.ref for p in rank_references(sims, avoid, k=3, rerank_lambda=0.0)] == [0, 1, 2]
    picks = rank_references(sims, avoid, k=3, rerank_lambda=0.3)
    assert [p.ref for p in picks] == [1, 0, 2]  # 0.77, 0.615, 0.10
    scores = {p.ref: p.score for p in picks}
    assert scores[1] == pytest.approx(0.80 - 0.3 * 0.10)
    assert scores[0] == pytest.approx(0.90 - 0.3 * 0.95)
    assert all(p.similarity == pytest.approx(sims[0, p.ref]) for p in picks)
    # No candidate, or lambda 0: plain similarity order.
    assert [p.ref for p in rank_references(sims, None, k=3, rerank_lambda=0.3)] == [0, 1, 2]
    np.testing.assert_allclose(reflective_scores(sims, avoid, 0.5), sims - 0.5 * avoid[None, :])


def test_reflective_rerank_order_is_by_reranked_score() -> None:
    sims = np.array([[0.90, 0.80, 0.70]])
    avoid = np.array([0.95, 0.10, 0.50])
    picks = rank_references(sims, avoid, k=3, rerank_lambda=0.3)
    # 0.615, 0.77, 0.55
    assert [p.ref for p in picks] == [1, 0, 2]
    assert [p.score for p in picks] == sorted((p.score for p in picks), reverse=True)


def test_rank_dedupes_across_concepts_keeping_the_best_and_interleaving() -> None:
    # Two concepts; ref 1 is wanted by both (best for concept 1).
    sims = np.array([[0.90, 0.60, 0.50, 0.10],
                     [0.20, 0.85, 0.30, 0.70]])
    picks = rank_references(sims, None, k=2, rerank_lambda=0.0)
    assert len({p.ref for p in picks}) == len(picks)  # each reference once
    by_ref = {p.ref: p.query for p in picks}
    assert by_ref[1] == 1  # kept where it scores best (0.85 > 0.60)
    assert by_ref == {0: 0, 2: 0, 1: 1, 3: 1}
    # Interleaved: each concept's best first, then each concept's second.
    assert [p.ref for p in picks] == [0, 1, 3, 2]


def test_rank_gives_a_shared_ref_to_the_other_concept_when_its_best_is_full() -> None:
    sims = np.array([[0.95, 0.90, 0.80],
                     [0.00, 0.00, 0.79]])
    picks = rank_references(sims, None, k=2, rerank_lambda=0.0)
    # Concept 0 fills its two slots with refs 0 and 1 first, so ref 2 goes to concept 1.
    assert {(p.ref, p.query) for p in picks} == {(0, 0), (1, 0), (2, 1)}


def test_rank_min_score_filters_on_relevance_not_on_the_reranked_score() -> None:
    sims = np.array([[0.30, 0.20, 0.05]])
    avoid = np.array([0.90, 0.00, 0.00])
    picks = rank_references(sims, avoid, k=3, rerank_lambda=1.0, min_score=0.1)
    # Ref 0 is relevant (0.30 >= 0.1) though its re-ranked score (-0.6) is low; ref 2 is not relevant.
    assert [p.ref for p in picks] == [1, 0]
    assert rank_references(sims, None, k=3, min_score=0.5) == []
    assert rank_references(np.zeros((1, 0)), None, k=2) == []


# ----------------------------------------------------------------------------------------------
# indexing and search with controlled vectors
# ----------------------------------------------------------------------------------------------

def test_index_then_search_text_and_image(tmp_path: Path, colours: Path) -> None:
    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    summary = store.index([colours], emb)
    assert summary["added"] == 5 and summary["total"] == 5 and summary["skipped"] == []
    assert set(summary) == {"added", "duplicates", "updated", "unchanged", "removed", "skipped", "notes", "total",
                            "seconds"}
    reader = open_store(tmp_path, emb, for_writing=False)
    top = reader.search_text(emb, "green", k=2)
    assert Path(top[0].path).name == "green.png" and top[0].score > top[1].score
    assert Path(reader.search_text(emb, "yellow", k=1)[0].path).name == "yellow.png"  # found in a nested folder
    similar = reader.search_image(emb, Image.new("RGB", (8, 8), (250, 10, 5)), k=1)
    assert Path(similar[0].path).name == "red.png" and similar[0].score > 0.99
    with pytest.raises(UserError, match="empty"):
        reader.search_text(emb, "  ", k=1)
    with pytest.raises(UserError, match="k must be"):
        reader.search_text(emb, "red", k=0)


def test_reindex_is_idempotent_and_reads_nothing(tmp_path: Path, colours: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    before = all_entries(store)

    def forbidden(*args, **kwargs):
        raise AssertionError("an unchanged file was opened")

    # Unchanged files must not be probed, read, hashed, decoded or embedded.
    monkeypatch.setattr(indexing_mod, "probe_image", forbidden)
    monkeypatch.setattr(indexing_mod, "decode_image", forbidden)
    monkeypatch.setattr(indexing_mod, "content_digest", forbidden)
    monkeypatch.setattr(Image, "open", forbidden)
    calls = emb.image_calls
    again = open_store(tmp_path, emb).index([colours], emb)
    assert (again["added"], again["updated"], again["unchanged"], again["total"]) == (0, 0, 5, 5)
    assert emb.image_calls == calls
    assert all_entries(store).keys() == before.keys()


def test_touched_file_is_hashed_but_not_embedded_again(tmp_path: Path, colours: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    red = colours / "red.png"
    os.utime(red, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    monkeypatch.setattr(indexing_mod, "decode_image", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    calls = emb.image_calls
    summary = store.index([colours], emb)
    assert (summary["added"], summary["updated"], summary["unchanged"]) == (0, 0, 5)
    assert emb.image_calls == calls
    # The new mtime is recorded: a third run does not even hash it.
    monkeypatch.setattr(indexing_mod, "content_digest", lambda *a: (_ for _ in ()).throw(AssertionError("hashed")))
    assert store.index([colours], emb)["unchanged"] == 5


def test_changed_file_is_updated_and_its_old_picture_removed(tmp_path: Path, colours: Path) -> None:
    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    old_ids = set(all_entries(store))
    target = colours / "blue.png"
    solid(target, (255, 0, 0), size=20)  # blue.png now holds a red picture
    summary = store.index([colours], emb)
    assert (summary["added"], summary["updated"], summary["unchanged"]) == (0, 1, 4)
    assert store.count() == 5
    new_ids = set(all_entries(store))
    assert len(old_ids - new_ids) == 1 and len(new_ids - old_ids) == 1
    reds = store.search_text(emb, "red", k=2)
    assert {Path(r.path).name for r in reds} == {"red.png", "blue.png"}
    assert not store.search_text(emb, "blue", k=1)[0].path.endswith("blue.png")


def test_file_turned_corrupt_is_skipped_and_forgotten(tmp_path: Path, colours: Path) -> None:
    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    (colours / "green.png").write_text("no longer a picture")
    summary = store.index([colours], emb)
    assert [s["path"] for s in summary["skipped"]] == [str(colours / "green.png")]
    assert store.count() == 4
    assert all(not r.path.endswith("green.png") for r in store.search_text(emb, "green", k=5))


def test_sidecar_caption_is_stored_and_a_caption_change_is_an_update(tmp_path: Path, colours: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    emb = ColourEmbedder()
    (colours / "red.txt").write_text("a red fire engine\n", encoding="utf-8")
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    assert store.search_text(emb, "red", k=1)[0].caption == "a red fire engine"
    (colours / "red.txt").write_text("a red rocket", encoding="utf-8")
    later = (colours / "red.txt").stat().st_mtime + 2  # a changed caption, whatever the file system's mtime grain
    os.utime(colours / "red.txt", (later, later))
    monkeypatch.setattr(indexing_mod, "probe_image", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
    summary = store.index([colours], emb)
    assert (summary["updated"], summary["unchanged"]) == (1, 4)
    ref = store.search_text(emb, "red", k=1)[0]
    assert ref.caption == "a red rocket"
    reopened = ReferenceStore.open(settings_for(tmp_path / "store"), emb.model_id, emb.dim)
    assert reopened.search_text(emb, "red", k=1)[0].caption == "a red rocket"


def test_prune_forgets_vanished_files_only_under_the_given_paths(tmp_path: Path, colours: Path) -> None:
    emb = ColourEmbedder()
    other = tmp_path / "other"
    solid(other / "grey.png", (128, 128, 128))
    store = open_store(tmp_path, emb)
    store.index([colours, other], emb)
    assert store.count() == 6
    (colours / "red.png").unlink()
    shutil.rmtree(other)
    kept = store.index([colours], emb)
    assert kept["removed"] == 0 and store.count() == 6  # without --prune nothing is forgotten...
    assert all(not r.path.endswith("red.png") for r in store.search_text(emb, "red", k=6))  # ...but never shown
    pruned = store.index([colours], emb, prune=True)
    assert pruned["removed"] == 1 and pruned["total"] == 5  # other/ is outside the given paths: kept
    gone_folder = store.index([other], emb, prune=True)  # a folder that is gone is allowed with prune
    assert gone_folder["removed"] == 1 and store.count() == 4
    with pytest.raises(UserError, match="no such file"):
        store.index([other], emb)


def test_same_picture_at_two_paths_is_one_entry(tmp_path: Path, colours: Path) -> None:
    emb = ColourEmbedder()
    shutil.copy(colours / "red.png", colours / "red-copy.png")
    store = open_store(tmp_path, emb)
    summary = store.index([colours], emb)
    # A copy is reported as what it is: a duplicate linked to the picture, not one more picture added.
    assert (summary["added"], summary["duplicates"], summary["total"]) == (5, 1, 5) and store.count() == 5
    entry_paths = [p for p in paths_per_entry(store).values() if len(p) == 2]
    assert entry_paths == [sorted([str(colours / "red.png"), str(colours / "red-copy.png")])]
    (colours / "red.png").unlink()
    assert store.search_text(emb, "red", k=1)[0].path == str(colours / "red-copy.png")
    assert store.index([colours], emb, prune=True)["removed"] == 1
    assert store.count() == 5
    shutil.copy(colours / "blue.png", colours / "blue-copy.png")  # a copy of a picture indexed in an earlier run
    later = store.index([colours], emb)
    assert (later["added"], later["duplicates"], later["unchanged"], later["total"]) == (0, 1, 5, 5)


def test_bad_files_are_skipped_with_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = ColourEmbedder()
    folder = tmp_path / "zoo"
    solid(folder / "good.png", (0, 200, 0))
    (folder / "empty.png").write_bytes(b"")
    jpeg = noise(folder / "truncated.jpg", seed=1, size=96)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (folder / "text.png").write_text("this is not a picture")
    png_claiming(folder / "bomb.png", 40000, 40000)
    png_claiming(folder / "huge.png", 10000, 10000)  # 100 MP: past imgrag's limit, under Pillow's bomb error
    noise(folder / "large.png", seed=2, size=64)
    monkeypatch.setattr(indexing_mod, "MAX_FILE_BYTES", 4000)  # large.png is ~12 kB
    (folder / "loop").mkdir()
    (folder / "loop" / "again").symlink_to(folder, target_is_directory=True)
    (folder / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "notes.md").write_text("not an image type: ignored, not skipped")
    summary = open_store(tmp_path, emb).index([folder], emb)
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert summary["added"] == 1 and summary["total"] == 1
    assert "empty" in reasons["empty.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["text.png"]
    # Pillow refuses a 1.6-gigapixel header outright; images.probe_image words that as "not an image".
    assert "decompression bomb" in reasons["bomb.png"]
    assert "10000x10000 exceeds the 64 megapixel limit" in reasons["huge.png"]
    assert "too large" in reasons["large.png"]
    assert "broken symlink" in reasons["broken.png"]
    assert "already walked" in reasons["again"]
    assert "notes.md" not in reasons
    assert all(not r.startswith(str(folder)) for r in reasons.values())  # the path is not repeated in the reason


def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading")
    emb = ColourEmbedder()
    folder = tmp_path / "locked"
    solid(folder / "ok.png", (1, 2, 3))
    secret = solid(folder / "secret.png", (4, 5, 6))
    secret.chmod(0)
    try:
        summary = open_store(tmp_path, emb).index([folder], emb)
    finally:
        secret.chmod(0o644)
    assert summary["added"] == 1
    assert [("secret.png", "permission denied")] == [(Path(s["path"]).name, s["reason"]) for s in summary["skipped"]]


def test_walk_follows_symlinked_folders_once_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "walk"
    solid(root / "a" / "one.png", (1, 1, 1))
    (root / "a" / "one.txt").write_text("caption")
    solid(root / ".thumbs" / "hidden.png", (2, 2, 2))
    solid(tmp_path / "elsewhere" / "two.webp", (3, 3, 3))
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "link2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    files, skipped = walk_images([root])
    assert sorted(Path(f.path).name for f in files) == ["one.png", "two.webp"]
    assert [Path(s["path"]).name for s in skipped] == ["link2"]
    one = next(f for f in files if f.path.endswith("one.png"))
    assert one.caption_path == str(root / "a" / "one.txt")
    files, skipped = walk_images([root / "a" / "one.txt"])
    assert files == [] and "not an image file type" in skipped[0]["reason"]


# ----------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------

def test_retrieve_reranks_away_from_the_failed_candidate(tmp_path: Path) -> None:
    emb = ColourEmbedder()
    folder = tmp_path / "pics"
    solid(folder / "crimson.png", (255, 0, 100))  # very red, and close to the magenta candidate
    solid(folder / "orange.png", (255, 120, 0))  # a little less red, far from the candidate
    solid(folder / "blue.png", (0, 0, 255))
    store = open_store(tmp_path, emb)
    store.index([folder], emb)
    candidate = Image.new("RGB", (16, 16), (255, 0, 255))
    plain = store.retrieve(emb, ["red"], k=2, avoid=candidate, rerank_lambda=0.0)
    assert [Path(r.path).name for r in plain] == ["crimson.png", "orange.png"]
    reflective = store.retrieve(emb, ["red"], k=2, avoid=candidate, rerank_lambda=0.3)
    assert [Path(r.path).name for r in reflective] == ["orange.png", "crimson.png"]
    # The score is exactly sim(query, ref) - λ·sim(candidate, ref) on the embedder's vectors.
    c = emb.embed_images([candidate])[0]
    for ref in reflective:
        v = emb.embed_images([Image.open(ref.path)])[0]
        assert ref.score == pytest.approx(float(emb.embed_texts(["red"])[0] @ v) - 0.3 * float(c @ v), abs=1e-5)
        assert ref.query == "red" and ref.similarity == pytest.approx(float(emb.embed_texts(["red"])[0] @ v),
                                                                      abs=1e-5)


def test_retrieve_merges_concepts_without_duplicates(tmp_path: Path, colours: Path) -> None:
    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    refs = store.retrieve(emb, ["red", "yellow", "red"], k=2)
    ids = [r.id for r in refs]
    assert len(ids) == len(set(ids)) == 4
    by_name = {Path(r.path).name: r.query for r in refs}
    assert by_name["red.png"] == "red" and by_name["yellow.png"] == "yellow"
    assert refs[0].query != refs[1].query  # interleaved: each concept's best first
    assert store.retrieve(emb, ["red"], k=2, min_score=0.99) == [store.retrieve(emb, ["red"], k=1)[0]]
    with pytest.raises(UserError):
        store.retrieve(emb, ["  "], k=2)


def test_missing_file_is_never_returned(tmp_path: Path, colours: Path) -> None:
    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    red_id = store.search_text(emb, "red", k=1)[0].id
    (colours / "red.png").unlink()
    assert all(Path(r.path).exists() for r in store.retrieve(emb, ["red", "green"], k=3))
    assert red_id not in {r.id for r in store.retrieve(emb, ["red"], k=5)}
    assert Path(store.search_text(emb, "red", k=1)[0].path).name == "orange.jpg"
    green_id = store.search_text(emb, "green", k=1)[0].id
    every = {r.id for r in store.search_text(emb, "red", k=store.count())}
    assert red_id not in every and green_id in every and len(every) == store.count() - 1


def test_empty_or_missing_store_reads_as_empty(tmp_path: Path) -> None:
    emb = ColourEmbedder()
    store = ReferenceStore.open(settings_for(tmp_path / "nothing-here"), emb.model_id, emb.dim)
    assert store.count() == 0 and store.retrieve(emb, ["red"], k=2) == [] and store.search_text(emb, "red", k=2) == []
    assert not (tmp_path / "nothing-here").exists()  # reading never creates a store
    # A reader opened before the store existed sees what a later index adds (the agent opens once per run).
    solid(tmp_path / "pics" / "red.png", (255, 0, 0))
    ReferenceStore.open(settings_for(tmp_path / "nothing-here"), emb.model_id, emb.dim,
                        for_writing=True).index([tmp_path / "pics"], emb)
    assert store.count() == 1 and Path(store.retrieve(emb, ["red"], k=1)[0].path).name == "red.png"


# ----------------------------------------------------------------------------------------------
# embedders, backends, lock, crash safety
# ----------------------------------------------------------------------------------------------

def test_querying_with_another_embedder_is_a_clear_error(tmp_path: Path, colours: Path) -> None:
    built = ColourEmbedder("colour-v1")
    open_store(tmp_path, built).index([colours], built)
    other = ColourEmbedder("colour-v2")
    with pytest.raises(UserError, match=r"built with another embedder: 'colour-v1' \(dim 4, 5 pictures\)"):
        open_store(tmp_path, other, for_writing=False)
    # Indexing with the new embedder builds its own collection beside the first.
    assert open_store(tmp_path, other).index([colours], other)["total"] == 5
    assert open_store(tmp_path, other, for_writing=False).count() == 5
    store = open_store(tmp_path, built, for_writing=False)
    with pytest.raises(UserError, match="opened for embedder 'colour-v1'"):
        store.search_text(other, "red", k=1)
    assert collection_name("colour-v1", 4) != collection_name("colour-v2", 4)
    assert collection_name("local-dir:/a b/c", 512).startswith("imgrag-local-dir-a-b-c-512d-")


def test_second_writer_waits_for_the_lock_and_says_so(tmp_path: Path, colours: Path) -> None:
    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    lock_file = tmp_path / "store" / ".write.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); time.sleep(1.0)", str(lock_file)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waits: list[str] = []
        start = time.monotonic()
        summary = store.index([colours], emb, on_wait=waits.append)
        waited = time.monotonic() - start
    finally:
        holder.wait(timeout=10)
    assert len(waits) == 1 and "waiting" in waits[0] and str(lock_file) in waits[0]
    assert waited > 0.3 and summary["unchanged"] == 5


def _chroma_executable() -> str | None:
    local = Path(sys.executable).parent / "chroma"
    return str(local) if local.exists() else shutil.which("chroma")


@pytest.fixture
def chroma_server(tmp_path: Path):
    exe = _chroma_executable()
    if exe is None:
        pytest.skip("the `chroma` executable (chromadb's server) is not installed")
    log = (tmp_path / "chroma.log").open("w")
    try:
        proc, port = start_server(lambda port: [exe, "run", "--path", str(tmp_path / "server-data"),
                                                "--host", "127.0.0.1", "--port", str(port)],
                                  timeout=30, stdout=log, stderr=subprocess.STDOUT)
    except ServerDidNotStart as exc:
        log.close()
        pytest.fail(f"chroma run did not start ({exc}): {(tmp_path / 'chroma.log').read_text()[-500:]}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def test_server_mode_against_chroma_run(tmp_path: Path, colours: Path, chroma_server: str) -> None:
    emb = ColourEmbedder()
    settings = settings_for(chroma_server)
    store = ReferenceStore.open(settings, emb.model_id, emb.dim, for_writing=True)
    assert store.is_server
    assert store.index([colours], emb)["added"] == 5
    again = ReferenceStore.open(settings, emb.model_id, emb.dim)
    assert again.count() == 5 and store.index([colours], emb)["unchanged"] == 5
    assert Path(again.search_text(emb, "blue", k=1)[0].path).name == "blue.png"
    assert {Path(r.path).name for r in again.retrieve(emb, ["red", "green"], k=1)} == {"red.png", "green.png"}
    with pytest.raises(UserError, match="built with another embedder"):
        ReferenceStore.open(settings, "colour-v9", 4)


def test_unreachable_server_is_a_user_error() -> None:
    with pytest.raises(UserError, match="cannot reach the Chroma server.*chroma run"):
        ReferenceStore.open(settings_for(f"http://127.0.0.1:{free_port()}"), "x", 4)


def test_tiny_clip_index_then_search_finds_the_same_picture(tmp_path: Path, clip) -> None:
    folder = tmp_path / "photos"
    for i in range(12):
        noise(folder / f"p{i:02d}.png", seed=i, size=48)
    noise(folder / "jpegs" / "p12.jpg", seed=12, size=48, fmt="JPEG")
    store = open_store(tmp_path, clip)
    assert store.name.startswith("imgrag-local-dir-open-clip-") and store.dim == clip.dim == 32
    summary = store.index([folder], clip)
    assert summary["added"] == 13 and summary["total"] == 13
    probe = tmp_path / "query.png"
    shutil.copy(folder / "p07.png", probe)
    from imgrag.images import open_image

    hits = store.search_image(clip, open_image(probe), k=3)
    assert Path(hits[0].path).name == "p07.png" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score >= hits[1].score >= hits[2].score
    found = store.search_text(clip, "a rocket", k=4)
    assert len(found) == 4 and all(Path(r.path).exists() for r in found)
    refs = store.retrieve(clip, ["a rocket", "a wooden cradle"], k=2, avoid=open_image(probe))
    assert len({r.id for r in refs}) == len(refs) == 4


@pytest.mark.slow
def test_kill_9_mid_index_then_rerun_indexes_every_file_exactly_once(tmp_path: Path, tiny_settings,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from agent.frontends.cli.app import main

    folder = tmp_path / "many"
    files = [noise(folder / f"d{i % 5}" / f"img{i:03d}.png", seed=1000 + i, size=24) for i in range(200)]
    env = {**os.environ, "IMGRAG_TINY_KIT_DIR": tiny_settings.tiny_kit_dir, "HF_HUB_OFFLINE": "1",
           "IMGRAG_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "agent.frontends.cli", "index", str(folder), "--profile", "tiny",
                             "--batch-size", "4"], cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    killed_at = None
    try:
        for line in proc.stderr:
            if line.startswith("read "):
                done = int(line.split()[1].split("/")[0])
                if done >= 40:
                    assert proc.poll() is None
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = done
                    break
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=30)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL

    settings = load_settings("tiny")
    from imgrag.models.embedder import Embedder

    clip_id = Embedder.from_pretrained(settings)
    partial = ReferenceStore.open(settings, clip_id.model_id, clip_id.dim).count()
    assert killed_at <= partial < 200

    with pytest.raises(SystemExit) as done:
        main(["index", str(folder), "--profile", "tiny", "--json"])
    assert done.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["unchanged"] == partial and summary["added"] == 200 - partial
    assert summary["updated"] == 0 and summary["skipped"] == [] and summary["total"] == 200

    store = ReferenceStore.open(settings, clip_id.model_id, clip_id.dim)
    listed = [p for paths in paths_per_entry(store).values() for p in paths]
    assert store.count() == 200 and sorted(listed) == sorted(str(f) for f in files)  # each file once, none twice



def test_a_crash_between_two_writes_is_settled_by_the_next_run(tmp_path: Path, colours: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the new picture was written but before the old entry let go of the path."""
    from chromadb.api.models.Collection import Collection

    emb = ColourEmbedder()
    store = open_store(tmp_path, emb)
    store.index([colours], emb)
    solid(colours / "blue.png", (10, 200, 10), size=20)  # changed content
    with monkeypatch.context() as m:
        m.setattr(Collection, "update", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        m.setattr(Collection, "delete", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            store.index([colours], emb)
    claimed = [p for paths in paths_per_entry(store).values() for p in paths]
    assert claimed.count(str(colours / "blue.png")) == 2  # the in-between state a crash can leave
    summary = open_store(tmp_path, emb).index([colours], emb)
    assert (summary["updated"], summary["unchanged"], summary["total"]) == (1, 4, 5)
    claimed = [p for paths in paths_per_entry(store).values() for p in paths]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 5


def test_a_long_lived_reader_sees_pictures_another_process_indexed_since(colours: Path, tmp_path: Path) -> None:
    """Chroma caches its client (and its vector index) per path in a process; the reader must not be stuck with
    the store as it was when it opened it. The writer is a second process, as a chat beside `imgrag index` is."""
    embedder = ColourEmbedder()
    store = open_store(tmp_path, embedder)
    store.index([colours / "red.png"], embedder)
    reader = open_store(tmp_path, embedder, for_writing=False)
    assert [r.path for r in reader.search_text(embedder, "blue", k=5)] == [str(colours / "red.png")]

    script = (
        "import sys; sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[4]);"
        "from test_store import ColourEmbedder, open_store; from pathlib import Path;"
        "e = ColourEmbedder(); open_store(Path(sys.argv[1]), e).index([sys.argv[2]], e)")
    tests_dir = Path(__file__).resolve().parent
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(colours / "blue.png"), str(tests_dir),
                    str(tests_dir.parent)], check=True, timeout=120)

    found = [r.path for r in reader.search_text(embedder, "blue", k=5)]
    assert found[0] == str(colours / "blue.png"), found
    assert reader.count() == 2
    # The first store object of this process moved to the reopened client too.
    assert [r.path for r in store.search_text(embedder, "blue", k=1)] == [str(colours / "blue.png")]


def test_a_corrupt_store_is_one_line(tmp_path: Path, colours: Path) -> None:
    embedder = ColourEmbedder()
    store = open_store(tmp_path, embedder)
    store.index([colours / "red.png"], embedder)
    database = tmp_path / "store" / "chroma.sqlite3"
    data = bytearray(database.read_bytes())
    data[:4096] = b"\0garbage" * 512  # the SQLite header and first page gone
    database.write_bytes(bytes(data))
    client_mod._CLIENTS.clear()  # as a new process would open it
    from chromadb.api.shared_system_client import SharedSystemClient

    SharedSystemClient._identifier_to_system.pop(str(tmp_path / "store"), None)
    with pytest.raises(UserError, match="cannot open the store .*not a database") as info:
        open_store(tmp_path, embedder, for_writing=False)
    assert "\n" not in str(info.value)
