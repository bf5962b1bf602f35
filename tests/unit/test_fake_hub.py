"""The fake Hugging Face hub, exercised through the real `huggingface_hub` client and plain HTTP."""

from __future__ import annotations

import hashlib
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from devkit.fake_hub import FakeHub

# Registers the `fake_hub` and `fake_hub_env` fixtures.

REPO = "acme/tiny-llm"
CONFIG = b'{"model_type": "llama", "vocab_size": 32}\n'
WEIGHTS_V1 = random.Random(1).randbytes(3000)
WEIGHTS_V2 = random.Random(2).randbytes(4000)
NESTED = b"nested-lfs-by-extension"
README = b"# tiny\n"
MIB = 1024 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
        f"size {len(data)}\n"
    ).encode()


@pytest.fixture
def tiny_hub(fake_hub_env: FakeHub) -> FakeHub:
    fake_hub_env.add_repo(
        REPO,
        {"config.json": CONFIG, "model.gguf": WEIGHTS_V1, "sub/dir/w.bin": NESTED, "sub/README.md": README},
    )
    return fake_hub_env


@pytest.fixture
def api(tiny_hub: FakeHub) -> HfApi:
    # token=False: nothing from the environment or disk may be sent, whatever the machine holds.
    return HfApi(endpoint=tiny_hub.url, token=False)


def download(hub: FakeHub, tmp_path: Path, filename: str, **kwargs: object) -> bytes:
    kwargs.setdefault("token", False)
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    path = hf_hub_download(REPO, filename, endpoint=hub.url, **kwargs)  # type: ignore[call-overload]
    return Path(path).read_bytes()


# ---------------------------------------------------------------- metadata


def test_model_info_with_files_metadata_pins_sha_and_reports_sizes_and_lfs_sha256(
    tiny_hub: FakeHub, api: HfApi
) -> None:
    info = api.model_info(REPO, files_metadata=True)

    assert info.id == REPO
    assert info.sha == tiny_hub.head(REPO)
    assert info.private is False and info.gated is False
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {"config.json", "model.gguf", "sub/dir/w.bin", "sub/README.md"}
    gguf = siblings["model.gguf"]
    assert gguf.size == len(WEIGHTS_V1)
    assert gguf.lfs is not None
    assert gguf.lfs.sha256 == hashlib.sha256(WEIGHTS_V1).hexdigest()
    assert gguf.lfs.size == len(WEIGHTS_V1)
    assert gguf.lfs.pointer_size == len(lfs_pointer(WEIGHTS_V1))
    # The git blob of an LFS file is its pointer; a regular file's blob is its content.
    assert gguf.blob_id == git_blob_id(lfs_pointer(WEIGHTS_V1))
    config = siblings["config.json"]
    assert (config.size, config.lfs, config.blob_id) == (len(CONFIG), None, git_blob_id(CONFIG))
    assert siblings["sub/dir/w.bin"].lfs is not None  # LFS by extension even though it is tiny
    assert "gguf" in (info.tags or [])

    plain = api.model_info(REPO)
    assert plain.sha == info.sha
    assert all(s.size is None for s in plain.siblings or [])
    assert [r.query.get("blobs") for r in tiny_hub.requests if r.path.startswith("/api/")] == [["true"], None]


def test_model_info_expand_returns_only_the_asked_properties(tiny_hub: FakeHub, api: HfApi) -> None:
    info = api.model_info(REPO, expand=["sha", "gated", "notAProperty"])  # type: ignore[list-item]

    assert info.sha == tiny_hub.head(REPO)
    assert info.gated is False
    assert info.siblings is None and info.private is None


def test_model_info_at_an_old_commit_shows_the_old_files(tiny_hub: FakeHub, api: HfApi) -> None:
    first = tiny_hub.head(REPO)
    second = tiny_hub.commit(REPO, {"model.gguf": WEIGHTS_V2}, delete=["sub"])

    assert second != first and tiny_hub.head(REPO) == second
    new = api.model_info(REPO, files_metadata=True)
    old = api.model_info(REPO, revision=first, files_metadata=True)

    assert new.sha == second
    assert {s.rfilename: s.size for s in new.siblings or []} == {
        "config.json": len(CONFIG),
        "model.gguf": len(WEIGHTS_V2),
    }
    assert old.sha == first
    assert {s.rfilename: s.size for s in old.siblings or []} == {
        "config.json": len(CONFIG),
        "model.gguf": len(WEIGHTS_V1),
        "sub/dir/w.bin": len(NESTED),
        "sub/README.md": len(README),
    }


def test_pr_ref_revision_travels_url_encoded_and_resolves(
    tiny_hub: FakeHub, api: HfApi, tmp_path: Path
) -> None:
    tiny_hub.create_branch(REPO, "refs/pr/1")
    pr_sha = tiny_hub.commit(REPO, {"model.gguf": WEIGHTS_V2}, branch="refs/pr/1")

    assert api.model_info(REPO, revision="refs/pr/1").sha == pr_sha
    assert download(tiny_hub, tmp_path, "model.gguf", revision="refs/pr/1") == WEIGHTS_V2
    assert download(tiny_hub, tmp_path, "model.gguf") == WEIGHTS_V1
    assert "/api/models/acme/tiny-llm/revision/refs%2Fpr%2F1" in [r.path for r in tiny_hub.requests]


def test_list_repo_tree_recursive_follows_pagination(tiny_hub: FakeHub, api: HfApi) -> None:
    tiny_hub.tree_page_size = 2

    entries = list(api.list_repo_tree(REPO, recursive=True))

    by_path = {e.path: e for e in entries}
    assert [e.path for e in entries] == [
        "config.json",
        "model.gguf",
        "sub",
        "sub/README.md",
        "sub/dir",
        "sub/dir/w.bin",
    ]
    assert isinstance(by_path["sub/dir"], RepoFolder)
    gguf = by_path["model.gguf"]
    assert isinstance(gguf, RepoFile) and gguf.lfs is not None
    assert gguf.lfs.sha256 == hashlib.sha256(WEIGHTS_V1).hexdigest()
    assert gguf.size == len(WEIGHTS_V1)
    readme = by_path["sub/README.md"]
    assert isinstance(readme, RepoFile) and readme.lfs is None and readme.blob_id == git_blob_id(README)
    tree_calls = [r for r in tiny_hub.requests if "/tree/" in r.path]
    assert len(tree_calls) == 3
    assert [bool(r.query.get("cursor")) for r in tree_calls] == [False, True, True]


def test_list_repo_tree_of_a_folder_lists_its_children_only(tiny_hub: FakeHub, api: HfApi) -> None:
    entries = list(api.list_repo_tree(REPO, path_in_repo="sub"))

    assert [(type(e).__name__, e.path) for e in entries] == [
        ("RepoFile", "sub/README.md"),
        ("RepoFolder", "sub/dir"),
    ]
    nested = list(api.list_repo_tree(REPO, path_in_repo="sub/dir", expand=True))
    assert [e.path for e in nested] == ["sub/dir/w.bin"]
    assert isinstance(nested[0], RepoFile) and nested[0].last_commit is not None
    assert nested[0].last_commit.oid == tiny_hub.head(REPO)


def test_list_repo_tree_of_a_missing_folder_raises_entry_not_found(api: HfApi) -> None:
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="nope"))


def test_get_paths_info_describes_known_paths_and_skips_unknown_ones(tiny_hub: FakeHub, api: HfApi) -> None:
    infos = api.get_paths_info(REPO, ["model.gguf", "sub", "missing.bin", "config.json"])

    assert [e.path for e in infos] == ["model.gguf", "sub", "config.json"]
    gguf, folder, config = infos
    assert isinstance(gguf, RepoFile) and gguf.lfs is not None
    assert gguf.lfs.sha256 == hashlib.sha256(WEIGHTS_V1).hexdigest()
    assert isinstance(folder, RepoFolder)
    assert isinstance(config, RepoFile) and config.size == len(CONFIG) and config.lfs is None


def test_last_commit_points_at_the_commit_that_changed_the_path(tiny_hub: FakeHub, api: HfApi) -> None:
    first = tiny_hub.head(REPO)
    second = tiny_hub.commit(REPO, {"model.gguf": WEIGHTS_V2}, message="new weights")

    infos = {e.path: e for e in api.get_paths_info(REPO, ["model.gguf", "config.json"], expand=True)}

    assert infos["model.gguf"].last_commit is not None and infos["config.json"].last_commit is not None
    assert (infos["model.gguf"].last_commit.oid, infos["model.gguf"].last_commit.title) == (
        second,
        "new weights",
    )
    assert infos["config.json"].last_commit.oid == first


# ---------------------------------------------------------------- downloads


@pytest.mark.parametrize(
    ("filename", "content"),
    [("config.json", CONFIG), ("model.gguf", WEIGHTS_V1), ("sub/dir/w.bin", NESTED)],
)
def test_hf_hub_download_gets_exact_bytes_with_head_then_get(
    tiny_hub: FakeHub, tmp_path: Path, filename: str, content: bytes
) -> None:
    assert download(tiny_hub, tmp_path, filename) == content

    calls = [(r.method, r.status, r.range) for r in tiny_hub.requests if r.filename == filename]
    assert calls == [("HEAD", 200, None), ("GET", 200, None)]
    assert tiny_hub.bytes_served(REPO, filename) == len(content)
    assert tiny_hub.bytes_served() == len(content)


def test_hf_hub_download_at_a_pinned_revision_gets_that_commits_bytes(
    tiny_hub: FakeHub, tmp_path: Path
) -> None:
    first = tiny_hub.head(REPO)
    tiny_hub.commit(REPO, {"model.gguf": WEIGHTS_V2})

    assert download(tiny_hub, tmp_path, "model.gguf", revision=first) == WEIGHTS_V1
    assert download(tiny_hub, tmp_path, "model.gguf") == WEIGHTS_V2
    assert (
        download(tiny_hub, tmp_path, "model.gguf", revision=first, local_dir=tmp_path / "pinned")
        == WEIGHTS_V1
    )


def test_get_hf_file_metadata_reports_commit_etag_and_size(tiny_hub: FakeHub) -> None:
    lfs = get_hf_file_metadata(hf_hub_url(REPO, "model.gguf", endpoint=tiny_hub.url), token=False)
    regular = get_hf_file_metadata(hf_hub_url(REPO, "config.json", endpoint=tiny_hub.url), token=False)

    assert lfs.commit_hash == tiny_hub.head(REPO)
    assert lfs.etag == hashlib.sha256(WEIGHTS_V1).hexdigest()
    assert lfs.size == len(WEIGHTS_V1)
    assert lfs.xet_file_data is None
    assert regular.etag == git_blob_id(CONFIG)
    assert regular.size == len(CONFIG)
    assert tiny_hub.file_info(REPO, "model.gguf").etag == lfs.etag


def test_interrupted_download_is_resumed_with_a_range_request(fake_hub_env: FakeHub, tmp_path: Path) -> None:
    hub = fake_hub_env
    # The client keeps only whole 10 MiB chunks of a broken body, so a resume needs more than that.
    big = random.Random(3).randbytes(11 * MIB)
    hub.add_repo(REPO, {"weights.safetensors": big})
    hub.fail_after("weights.safetensors", 10 * MIB + MIB // 2)

    assert download(hub, tmp_path, "weights.safetensors") == big

    gets = [r for r in hub.requests if r.method == "GET" and r.filename == "weights.safetensors"]
    assert [(r.status, r.range, r.dropped) for r in gets] == [
        (200, None, True),
        (206, f"bytes={10 * MIB}-", False),
    ]
    assert gets[0].bytes_sent == 10 * MIB + MIB // 2
    assert hub.bytes_served(REPO, "weights.safetensors") < 2 * len(big)


def test_lfs_redirect_sends_the_client_to_storage_without_the_token(
    tiny_hub: FakeHub, tmp_path: Path
) -> None:
    tiny_hub.lfs_redirect = True

    metadata = get_hf_file_metadata(
        hf_hub_url(REPO, "model.gguf", endpoint=tiny_hub.url), token=tiny_hub.token
    )
    assert download(tiny_hub, tmp_path, "model.gguf", token=tiny_hub.token) == WEIGHTS_V1
    assert download(tiny_hub, tmp_path, "config.json", token=tiny_hub.token) == CONFIG

    # Size and etag come from the 302 itself, which has no body: X-Linked-Size is what carries the size.
    assert metadata.size == len(WEIGHTS_V1)
    assert metadata.etag == hashlib.sha256(WEIGHTS_V1).hexdigest()
    assert metadata.location.startswith(f"{tiny_hub.cdn_url}/cdn-lfs/")
    calls = [
        (r.method, r.path.split("/")[1], r.status, "Authorization" in r.headers) for r in tiny_hub.requests
    ]
    assert calls == [
        ("HEAD", "acme", 302, True),
        ("HEAD", "acme", 302, True),
        ("GET", "cdn-lfs", 200, False),
        ("HEAD", "acme", 200, True),
        ("GET", "acme", 200, True),
    ]
    assert tiny_hub.bytes_served(REPO, "model.gguf") == len(WEIGHTS_V1)


def test_snapshot_download_fetches_every_file_of_the_commit(tiny_hub: FakeHub, tmp_path: Path) -> None:
    folder = Path(snapshot_download(REPO, endpoint=tiny_hub.url, token=False, cache_dir=tmp_path / "cache"))

    assert folder.name == tiny_hub.head(REPO)
    assert (folder / "model.gguf").read_bytes() == WEIGHTS_V1
    assert (folder / "sub" / "dir" / "w.bin").read_bytes() == NESTED


def test_range_requests_answer_206_and_416(tiny_hub: FakeHub) -> None:
    url = f"{tiny_hub.url}/{REPO}/resolve/main/model.gguf"
    size = len(WEIGHTS_V1)
    with httpx.Client() as client:
        head = client.head(url)
        full = client.get(url)
        tail = client.get(url, headers={"Range": "bytes=1000-"})
        middle = client.get(url, headers={"Range": "bytes=10-19"})
        suffix = client.get(url, headers={"Range": "bytes=-5"})
        past_end = client.get(url, headers={"Range": f"bytes={size}-"})

    sha256 = hashlib.sha256(WEIGHTS_V1).hexdigest()
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(size)
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{sha256}"'
    assert head.headers["X-Linked-Size"] == str(size)
    assert head.headers["X-Repo-Commit"] == tiny_hub.head(REPO)
    assert head.headers["Accept-Ranges"] == "bytes"
    assert head.headers["Content-Type"] == "application/octet-stream"
    assert not any(name.lower().startswith("x-xet") for name in head.headers)
    assert full.status_code == 200 and full.content == WEIGHTS_V1
    assert (tail.status_code, tail.headers["Content-Range"]) == (206, f"bytes 1000-{size - 1}/{size}")
    assert tail.content == WEIGHTS_V1[1000:]
    assert (middle.status_code, middle.headers["Content-Range"], middle.content) == (
        206,
        f"bytes 10-19/{size}",
        WEIGHTS_V1[10:20],
    )
    assert suffix.status_code == 206 and suffix.content == WEIGHTS_V1[-5:]
    assert past_end.status_code == 416
    assert past_end.headers["Content-Range"] == f"bytes */{size}"


def test_regular_file_etag_is_its_git_blob_id_and_has_no_linked_headers(tiny_hub: FakeHub) -> None:
    head = httpx.head(f"{tiny_hub.url}/{REPO}/resolve/main/config.json")

    assert head.headers["ETag"] == f'"{git_blob_id(CONFIG)}"'
    assert "X-Linked-Etag" not in head.headers and "X-Linked-Size" not in head.headers


# ---------------------------------------------------------------- access and errors


def test_private_repo_is_not_found_without_token_and_readable_with_it(
    fake_hub_env: FakeHub, tmp_path: Path
) -> None:
    hub = fake_hub_env
    hub.add_repo(REPO, {"model.gguf": WEIGHTS_V1}, private=True)

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    assert anonymous.value.response.status_code == 401
    assert anonymous.value.response.headers["X-Error-Code"] == "RepoNotFound"
    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "model.gguf")

    info = HfApi(endpoint=hub.url, token=hub.token).model_info(REPO)
    assert info.private is True
    assert download(hub, tmp_path, "model.gguf", token=hub.token) == WEIGHTS_V1
    assert any(r.headers.get("Authorization") == f"Bearer {hub.token}" for r in hub.requests)


def test_wrong_token_is_rejected_with_401_even_on_a_public_repo(tiny_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(HfHubHTTPError) as caught:
        HfApi(endpoint=tiny_hub.url, token="hf_wrong").model_info(REPO)
    # Like the real hub: a bad credential is not reported as a missing repo.
    assert not isinstance(caught.value, RepositoryNotFoundError)
    assert caught.value.response.status_code == 401
    assert caught.value.server_message == "Invalid credentials in Authorization header"
    with pytest.raises(HfHubHTTPError):
        download(tiny_hub, tmp_path, "config.json", token="hf_wrong")


def test_missing_repo_is_401_anonymously_and_404_with_a_token(fake_hub_env: FakeHub) -> None:
    hub = fake_hub_env
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi(endpoint=hub.url, token=False).model_info("acme/missing")
    with pytest.raises(RepositoryNotFoundError) as authenticated:
        HfApi(endpoint=hub.url, token=hub.token).model_info("acme/missing")

    assert anonymous.value.response.status_code == 401
    assert authenticated.value.response.status_code == 404


def test_gated_repo_download_needs_an_approved_token(fake_hub_env: FakeHub, tmp_path: Path) -> None:
    hub = fake_hub_env
    hub.add_repo(REPO, {"model.gguf": WEIGHTS_V1}, gated=True)
    hub.add_token("hf_not_approved", gated_access=False)

    # The repo page and file list stay public, as on the hub; the files do not.
    assert HfApi(endpoint=hub.url, token=False).model_info(REPO).gated == "auto"
    with pytest.raises(GatedRepoError) as anonymous:
        download(hub, tmp_path, "model.gguf")
    with pytest.raises(GatedRepoError) as not_approved:
        download(hub, tmp_path, "model.gguf", token="hf_not_approved")

    assert anonymous.value.response.status_code == 401
    assert not_approved.value.response.status_code == 403
    assert download(hub, tmp_path, "model.gguf", token=hub.token) == WEIGHTS_V1


def test_unknown_revision_raises_revision_not_found(tiny_hub: FakeHub, api: HfApi, tmp_path: Path) -> None:
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        list(api.list_repo_tree(REPO, revision="no-such-branch"))
    with pytest.raises(RevisionNotFoundError):
        download(tiny_hub, tmp_path, "config.json", revision="no-such-branch")


def test_unknown_file_raises_entry_not_found(tiny_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(RemoteEntryNotFoundError) as caught:
        download(tiny_hub, tmp_path, "missing.gguf")

    response = caught.value.response
    assert response.status_code == 404
    assert caught.value.server_message == "Entry not found"
    # The commit header lets the client remember the file is absent at that commit.
    assert response.headers["X-Repo-Commit"] == tiny_hub.head(REPO)
    body = httpx.get(f"{tiny_hub.url}/{REPO}/resolve/main/missing.gguf")
    assert (body.status_code, body.json()) == (404, {"error": "Entry not found"})


def test_unknown_route_is_a_json_404(tiny_hub: FakeHub) -> None:
    response = httpx.get(f"{tiny_hub.url}/api/spaces/whatever")

    assert response.status_code == 404
    assert "error" in response.json()


# ---------------------------------------------------------------- fault injection


def test_throttle_paces_file_bodies(tiny_hub: FakeHub) -> None:
    url = f"{tiny_hub.url}/{REPO}/resolve/main/model.gguf"  # 3000 bytes
    tiny_hub.set_throttle(10_000)
    started = time.monotonic()
    throttled = httpx.get(url)
    throttled_s = time.monotonic() - started

    tiny_hub.set_throttle(None)
    started = time.monotonic()
    httpx.get(url)
    free_s = time.monotonic() - started

    assert throttled.content == WEIGHTS_V1
    assert throttled_s >= 0.28
    assert free_s < throttled_s


def test_a_total_throttle_paces_all_bodies_together_like_one_link(tiny_hub: FakeHub) -> None:
    url = f"{tiny_hub.url}/{REPO}/resolve/main/model.gguf"  # 3000 bytes
    tiny_hub.set_total_throttle(20_000)  # alone, one body would take 0.15 s
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _: httpx.get(url).content, range(4)))
    together_s = time.monotonic() - started
    assert bodies == [WEIGHTS_V1] * 4
    assert together_s >= 0.55  # 12,000 bytes through one 20,000 B/s link, not four
    tiny_hub.clear_faults()
    started = time.monotonic()
    httpx.get(url)
    assert time.monotonic() - started < together_s


def test_fail_after_drops_the_connection_mid_body_then_recovers(tiny_hub: FakeHub) -> None:
    url = f"{tiny_hub.url}/{REPO}/resolve/main/model.gguf"
    tiny_hub.fail_after("model.gguf", 100, times=2)

    for _ in range(2):
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url)
    whole = httpx.get(url)

    assert whole.content == WEIGHTS_V1
    assert [r.dropped for r in tiny_hub.requests] == [True, True, False]
    assert tiny_hub.bytes_served(REPO, "model.gguf") == 200 + len(WEIGHTS_V1)


def test_corrupt_serves_other_bytes_under_the_published_metadata(
    tiny_hub: FakeHub, api: HfApi, tmp_path: Path
) -> None:
    bad = bytes(b ^ 0xFF for b in WEIGHTS_V1)
    tiny_hub.corrupt(REPO, "model.gguf", bad)

    head = httpx.head(f"{tiny_hub.url}/{REPO}/resolve/main/model.gguf")
    (info,) = api.get_paths_info(REPO, ["model.gguf"])
    downloaded = download(tiny_hub, tmp_path, "model.gguf")

    published = hashlib.sha256(WEIGHTS_V1).hexdigest()
    assert head.headers["X-Linked-Etag"] == f'"{published}"'
    assert isinstance(info, RepoFile) and info.lfs is not None and info.lfs.sha256 == published
    # huggingface_hub does not check the sha256 of what it downloads: verifying is the caller's job.
    assert downloaded == bad
    tiny_hub.clear_faults()
    assert httpx.get(f"{tiny_hub.url}/{REPO}/resolve/main/model.gguf").content == WEIGHTS_V1


# ---------------------------------------------------------------- fixture plumbing


def test_fake_hub_fixture_is_started_and_empty(fake_hub: FakeHub) -> None:
    response = httpx.get(
        f"{fake_hub.url}/api/models/acme/anything", headers={"Authorization": "Bearer hf_fake_token"}
    )

    assert response.status_code == 404
    assert response.headers["X-Error-Code"] == "RepoNotFound"


def test_fake_hub_env_refuses_any_host_but_the_fake_hub(fake_hub_env: FakeHub) -> None:
    with pytest.raises(RuntimeError, match="only the fake hub"):
        HfApi(endpoint="https://huggingface.co", token=False).model_info("acme/anything")
    # Without an explicit endpoint the client goes to the fake hub.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("acme/anything")
    assert [r.path for r in fake_hub_env.requests] == ["/api/models/acme/anything"]


def test_stopped_hub_refuses_connections() -> None:
    with FakeHub() as hub:
        url = hub.url
        assert httpx.get(f"{url}/api/models/x/y").status_code == 401
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/api/models/x/y")


def test_repo_content_is_validated() -> None:
    hub = FakeHub()
    with pytest.raises(ValueError, match="both a file and a folder"):
        hub.add_repo("acme/clash", {"a": b"1", "a/b": b"2"})
    with pytest.raises(ValueError, match="invalid repo id"):
        hub.add_repo("a/b/c", {})
    hub.add_repo("acme/ok", {"a": b"1"})
    with pytest.raises(ValueError, match="no such file"):
        hub.commit("acme/ok", {}, delete=["missing"])
