"""Deltas shared on the Hugging Face Hub: pulled through huggingface_hub's cache, pushed as a folder with a card.

What runs here and what does not (no network on these machines): pulls run huggingface_hub's real
``snapshot_download`` on a cache laid out as the library lays out its downloads (:mod:`tests.hub_cache`,
checked by its own cache scanner), offline (``local_files_only`` or ``HF_HUB_OFFLINE``), with branches, tags
and commits. The Hub's error replies (no such repository, private, gated, no such revision) come from an
emulated endpoint on localhost, so that huggingface_hub's own error handling runs. A push builds exactly the
folder ``HfApi.upload_folder`` receives (the card is read back with huggingface_hub's card API, PEFT's files
with PEFT itself), and its failures (offline, an unreachable Hub, no write access) are real
``create_repo`` calls. No test uploads to or downloads from the real Hub.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import huggingface_hub
import peft
import pytest
import torch
from huggingface_hub import ModelCard, constants

from opendelta_dist import AdapterModel, AutoDeltaConfig, AutoDeltaModel, LoraModel
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError, DeltaHubError
from opendelta_dist.hub import write_upload_folder
from tests.hub_cache import HubErrorEndpoint, add_revision, check_layout, folder_files
from tests.models import batch, build, logits
from tests.train.distributed import free_port
from tests.train.launch import ROOT

REPO = "team/t5-lora"
BASE = "google-t5/t5-small"  # the backbone's recorded id: what the card names as base model


def _lora(seed: int = 0) -> tuple[torch.nn.Module, LoraModel]:
    model = _fresh()
    delta = LoraModel(model, lora_r=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_(std=0.3)
    return model, delta


def _fresh() -> torch.nn.Module:
    """The tiny T5, as if loaded with ``from_pretrained(BASE)`` (on its own copy of the shared config)."""
    model = build("t5")
    model.config = copy.deepcopy(model.config)
    model.config._name_or_path = BASE
    return model


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch):
    """huggingface_hub online, against an endpoint the test sets (``online(url)``)."""

    def use(url: str) -> None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", url)

    return use


def test_a_pushed_folder_round_trips_through_the_hub_cache_and_peft(cache, tmp_path):
    model, delta = _lora()
    inputs = batch("t5")
    expected = logits(model, inputs)
    folder = tmp_path / "upload"
    folder.mkdir()
    names = write_upload_folder(delta, folder, REPO)
    assert names == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "delta_model.safetensors",
    ]
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "opendelta-dist" and card.data.base_model == BASE
    assert {"opendelta-dist", "delta-tuning", "lora", "peft"} <= set(card.data.tags)
    assert f'AutoDeltaModel.from_finetuned("{REPO}", backbone_model=backbone)' in card.text
    assert f'PeftModel.from_pretrained(backbone, "{REPO}")' in card.text
    assert "T5ForConditionalGeneration.from_pretrained" in card.text

    add_revision(cache, REPO, folder_files(folder))
    assert check_layout(cache, REPO) == {"main"}
    pulled = AutoDeltaModel.from_finetuned(REPO, backbone_model=_fresh(), cache_dir=cache, local_files_only=True)
    assert isinstance(pulled, LoraModel)
    torch.testing.assert_close(logits(pulled.backbone_model, inputs), expected, atol=1e-6, rtol=0)
    # PEFT reads the same files (its base_model_name_or_path is the card's base model)
    snapshot = huggingface_hub.snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    assert json.loads((Path(snapshot) / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE
    in_peft = peft.PeftModel.from_pretrained(_fresh(), snapshot)
    torch.testing.assert_close(logits(in_peft, inputs), expected, atol=1e-5, rtol=0)


def test_revisions_branches_tags_and_commits_pull_their_own_delta(cache, tmp_path, monkeypatch):
    inputs = batch("t5")
    commits, expected = {}, {}
    for seed, refs in [(1, ("v1",)), (2, ("main",))]:
        model, delta = _lora(seed)
        expected[seed] = logits(model, inputs)
        folder = tmp_path / f"upload{seed}"
        delta.save_finetuned(folder)
        commits[seed] = add_revision(cache, REPO, folder_files(folder), refs=refs)
    assert check_layout(cache, REPO) == {"main", "v1"}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: the cache only
    for revision, seed in [(None, 2), ("main", 2), ("v1", 1), (commits[1], 1), (commits[2], 2)]:
        delta = AutoDeltaModel.from_finetuned(REPO, backbone_model=_fresh(), cache_dir=cache, revision=revision)
        torch.testing.assert_close(logits(delta.backbone_model, inputs), expected[seed], atol=1e-6, rtol=0)
    assert AutoDeltaConfig.from_finetuned(REPO, cache_dir=cache, revision="v1").lora_r == 4
    with pytest.raises(DeltaHubError, match=r"Hub repository 'team/t5-lora' \(revision 'v2'\) is not in the Hub cache"):
        AutoDeltaModel.from_finetuned(REPO, backbone_model=_fresh(), cache_dir=cache, revision="v2")


def test_opendelta_and_peft_checkpoints_and_subfolders_pull_from_a_repository(cache, tmp_path):
    # a checkpoint the real OpenDelta 0.3.2 wrote, in a repository's subfolder
    case = Path(__file__).parent / "fixtures" / "opendelta_0_3_2" / "t5"
    files = folder_files(case / "lora__default", prefix="deltas/lora/")
    add_revision(cache, "team/opendelta-t5", {**files, "README.md": b"# OpenDelta's LoRA\n"})
    backbone = build("t5")
    backbone.load_state_dict(_safetensors(case), strict=True)
    delta = AutoDeltaModel.from_finetuned(
        "team/opendelta-t5", backbone_model=backbone.eval(), cache_dir=cache, subfolder="deltas/lora"
    )
    reference = _safetensors(case / "lora__default", "outputs.safetensors")["logits"]
    inputs = {
        k.removeprefix("input."): v for k, v in _safetensors(case, "reference.safetensors").items() if "input." in k
    }
    with torch.no_grad():
        torch.testing.assert_close(delta.backbone_model(**inputs).logits, reference, atol=1e-4, rtol=0)
    with pytest.raises(DeltaCheckpointError, match=r"'team/opendelta-t5' holds no delta.*\['README.md', 'deltas'\]"):
        AutoDeltaModel.from_finetuned("team/opendelta-t5", backbone_model=build("t5"), cache_dir=cache)

    # an adapter PEFT saved
    trained = peft.get_peft_model(build("t5"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    with torch.no_grad():
        for _, p in ((n, p) for n, p in trained.named_parameters() if p.requires_grad):
            p.normal_(std=0.3)
    trained.save_pretrained(tmp_path / "peft")
    add_revision(cache, "team/peft-t5", folder_files(tmp_path / "peft"))
    loaded = AutoDeltaModel.from_finetuned("team/peft-t5", backbone_model=build("t5"), cache_dir=cache)
    torch.testing.assert_close(
        logits(loaded.backbone_model, batch("t5")), logits(trained, batch("t5")), atol=1e-5, rtol=0
    )


def _safetensors(folder: Path, name: str = "backbone.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / name)


def test_a_local_directory_wins_over_a_repository_of_that_name(cache, tmp_path, monkeypatch):
    model, delta = _lora(3)
    delta.save_finetuned(tmp_path / "team" / "t5-lora")
    _, other = _lora(4)
    other.save_finetuned(tmp_path / "other")
    add_revision(cache, REPO, folder_files(tmp_path / "other"))
    monkeypatch.chdir(tmp_path)
    pulled = AutoDeltaModel.from_finetuned(REPO, backbone_model=_fresh(), cache_dir=cache, local_files_only=True)
    inputs = batch("t5")
    torch.testing.assert_close(logits(pulled.backbone_model, inputs), logits(model, inputs), atol=1e-6, rtol=0)


def test_bad_pulls_name_the_repository_and_the_fix(cache, tmp_path, monkeypatch):
    with pytest.raises(
        DeltaHubError,
        match=r"there is no directory 'team/none' here, and Hub repository 'team/none' "
        r"is not in the Hub cache .* downloads are off \(HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or "
        r"local_files_only=True\): download it once online, or pass the local directory",
    ):
        AutoDeltaModel.from_finetuned("team/none", backbone_model=build("t5"), cache_dir=cache, local_files_only=True)
    monkeypatch.setenv("DELTACENTER_OFFLINE", "1")  # OpenDelta's offline switch works as local_files_only
    with pytest.raises(DeltaHubError, match="downloads are off"):
        AutoDeltaModel.from_finetuned("team/none", backbone_model=build("t5"), cache_dir=cache)
    with pytest.raises(DeltaHubError, match=r"no such directory .* not a Hub repository id"):
        AutoDeltaModel.from_finetuned("./runs/a/b/final", backbone_model=build("t5"), cache_dir=cache)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(DeltaCheckpointError, match="is a file; a delta checkpoint is the directory"):
        AutoDeltaModel.from_finetuned(tmp_path / "weights.bin", backbone_model=build("t5"))
    # a model repository, not a delta
    add_revision(cache, "team/model", {"config.json": json.dumps({"model_type": "t5"}).encode()})
    with pytest.raises(DeltaCheckpointError, match=r"'team/model' holds no delta.*\['config.json'\].*from_pretrained"):
        AutoDeltaModel.from_finetuned("team/model", backbone_model=build("t5"), cache_dir=cache, local_files_only=True)
    backbone = build("t5")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(DeltaHubError):
        AutoDeltaModel.from_finetuned("team/none", backbone_model=backbone, cache_dir=cache, local_files_only=True)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # untouched


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (
            (404, {"X-Error-Code": "RepoNotFound"}),
            r"'team/none' was not found on http://127.*: check the id, or, if "
            r"it is private, log in with `hf auth login`",
        ),
        ((401, {}), r"'team/none': 401 Unauthorized .*private; log in with `hf auth login`"),  # private, no token
        (
            (401, {"X-Error-Message": "Invalid credentials in Authorization header"}),
            r"'team/none': 401 Unauthorized \(the Hub says: Invalid credentials in Authorization header\): the token "
            r"was refused, or the repository is private; log in",
        ),
        ((403, {}), r"'team/none': 403 Forbidden \(the Hub says: emulated\): the token has no access to it"),
        ((403, {"X-Error-Code": "GatedRepo"}), r"'team/none' is gated: ask for access on its page, then log in"),
        (
            (404, {"X-Error-Code": "RevisionNotFound"}),
            r"'team/none' \(revision 'v7'\): the repository has no such "
            r"revision; pass an existing branch, tag or full commit id",
        ),
        ((429, {}), r"'team/none': 429 Too Many Requests .*: rate-limited by http://127.*wait and try again"),
        ((503, {}), r"'team/none': 503 from http://127.*: the Hub failed; try again later"),
    ],
)
def test_the_hubs_error_replies_become_clear_errors(reply, match, cache, online):
    endpoint = HubErrorEndpoint({"/api/models/team/none": reply})
    with endpoint.running() as url:
        online(url)
        revision = "v7" if "Revision" in str(reply) else None
        with pytest.raises(DeltaHubError, match=match):
            AutoDeltaModel.from_finetuned("team/none", backbone_model=build("t5"), cache_dir=cache, revision=revision)


def test_an_unreachable_hub_is_named_and_the_cache_still_serves(cache, tmp_path, online):
    online(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(
        DeltaHubError, match=r"is not in the Hub cache .* the Hub at http://127.0.0.1:\d+ cannot be reach"
    ):
        AutoDeltaModel.from_finetuned(REPO, backbone_model=_fresh(), cache_dir=cache)
    _, delta = _lora()
    delta.save_finetuned(tmp_path / "saved")
    add_revision(cache, REPO, folder_files(tmp_path / "saved"))
    AutoDeltaModel.from_finetuned(REPO, backbone_model=_fresh(), cache_dir=cache)  # as transformers: the cached copy


def test_a_push_that_cannot_happen_leaves_nothing_half_written(tmp_path, monkeypatch, online):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model, delta = _lora()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DeltaHubError, match="HF_HUB_OFFLINE is set"):
        delta.save_finetuned(tmp_path / "offline", push_to_hub=True, repo_id=REPO)
    assert not (tmp_path / "offline").exists()  # refused before anything was written
    with pytest.raises(DeltaHubError, match="not a Hub repository id"):
        delta.push_to_hub("team/bad name")

    online(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(
        DeltaHubError, match=r"the Hub at http://127.0.0.1:\d+ cannot be reached .*nothing was uploaded"
    ):
        delta.save_finetuned(tmp_path / "local", push_to_hub=True, repo_id=REPO, token="hf_test")
    reloaded = AutoDeltaModel.from_finetuned(tmp_path / "local", backbone_model=_fresh())  # the local save is whole
    torch.testing.assert_close(
        logits(reloaded.backbone_model, batch("t5")), logits(model, batch("t5")), atol=1e-6, rtol=0
    )
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["config.json", "delta_model.safetensors"]
    endpoint = HubErrorEndpoint({"/api/repos/create": (403, {})})
    with endpoint.running() as url:
        online(url)
        with pytest.raises(DeltaHubError, match=r"not allowed to create or write to 'team/t5-lora' \(403\)"):
            delta.push_to_hub(REPO, token="hf_test")
    assert list((tmp_path / "tmp").iterdir()) == []  # no staging folder left


def test_cards_of_other_methods_and_opendeltas_deltacenter_options(tmp_path):
    model = build("bert")
    delta = AdapterModel(model)
    folder = tmp_path / "upload"
    folder.mkdir()
    assert write_upload_folder(delta, folder, "team/bert-adapter") == [
        "README.md",
        "config.json",
        "delta_model.safetensors",
    ]
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None and "peft" not in card.data.tags and "adapter" in card.data.tags
    assert "PEFT cannot read this delta: it reads LoRA adapters only." in card.text
    assert "A delta of type `adapter` (AdapterModel)" in card.text
    assert "the `BertForSequenceClassification` it was trained on (its Hub id was not recorded)" in card.text

    with pytest.warns(UserWarning, match=r"DeltaCenter is gone, so push_to_dc=True uploads nothing.*push_to_hub=True"):
        delta.save_finetuned(tmp_path / "dc", push_to_dc=True, center_args={"name": "x"}, list_tags=["a"], usage="u")
    assert (tmp_path / "dc" / "config.json").is_file()
    with pytest.raises(DeltaConfigError, match=r"unknown options \['push_to_hubb'\]"):
        delta.save_finetuned(tmp_path / "typo", push_to_hubb=True)
    with pytest.raises(DeltaConfigError, match="takes no save_function"):
        delta.save_finetuned(tmp_path / "fn", save_function=lambda *a: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delta.save_finetuned(tmp_path / "plain", save_function=torch.save)
    shutil.rmtree(tmp_path / "plain")


def test_the_real_hub_round_trip_script_names_what_it_needs(monkeypatch, tmp_path, capsys, online):
    """scripts/hub_roundtrip.py is the check against the real Hub (never run here): it refuses clearly offline
    and without a token, before it builds or sends anything."""
    spec = importlib.util.spec_from_file_location("hub_roundtrip", ROOT / "scripts" / "hub_roundtrip.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert script.main([]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    online(f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert script.main([]) == 2
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err


def test_opendeltas_cache_dir_subfolders_and_peft_beside_a_model_config(cache, tmp_path):
    """OpenDelta read ``cache_dir/path`` as the checkpoint; a subfolder is read inside the repository whatever its
    slashes, and never outside it; a PEFT adapter beside its base model's config.json is PEFT's. The backbone is
    left in evaluation mode, as OpenDelta's from_finetuned left it."""
    model, delta = _lora(5)
    delta.save_finetuned(tmp_path / "deltas" / "sst2")
    fresh = _fresh().train()
    loaded = LoraModel.from_finetuned("sst2", fresh, cache_dir=tmp_path / "deltas")
    assert not fresh.training
    torch.testing.assert_close(
        logits(loaded.backbone_model, batch("t5")), logits(model, batch("t5")), atol=1e-6, rtol=0
    )

    add_revision(cache, REPO, folder_files(tmp_path / "deltas", prefix="runs/"))
    for subfolder in ("runs/sst2", "/runs/sst2/", "runs/sst2/"):
        AutoDeltaModel.from_finetuned(REPO, backbone_model=_fresh(), cache_dir=cache, subfolder=subfolder)
    with pytest.raises(DeltaCheckpointError, match=r"subfolder '../x' leaves the checkpoint's directory"):
        AutoDeltaModel.from_finetuned(REPO, backbone_model=_fresh(), cache_dir=cache, subfolder="../x")

    delta.save_peft(tmp_path / "with-model")
    (tmp_path / "with-model" / "config.json").write_text(json.dumps({"model_type": "t5"}))  # the base model's
    with pytest.raises(DeltaConfigError, match=r"holds a PEFT LoRA adapter, whose options are read with its tensors"):
        AutoDeltaConfig.from_finetuned(tmp_path / "with-model")
    peft_loaded = AutoDeltaModel.from_finetuned(tmp_path / "with-model", backbone_model=_fresh())
    torch.testing.assert_close(
        logits(peft_loaded.backbone_model, batch("t5")), logits(model, batch("t5")), atol=1e-5, rtol=0
    )


def test_a_bad_token_is_named(cache, tmp_path, monkeypatch, online):
    online(f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(DeltaHubError, match=r"token=True asks for the saved token, and there is none: log in"):
        AutoDeltaModel.from_finetuned("team/none", backbone_model=build("t5"), cache_dir=cache, token=True)


def test_a_card_cell_keeps_the_tables_columns(tmp_path):
    model = build("t5")
    delta = LoraModel(model, modified_modules=[r"[r](SelfAttention|EncDecAttention)\.q"])
    folder = tmp_path / "upload"
    folder.mkdir()
    write_upload_folder(delta, folder, REPO)
    row = next(line for line in ModelCard.load(folder / "README.md").text.splitlines() if "modified_modules" in line)
    assert row.count(" | ") == 1 and "\\|" in row, row
