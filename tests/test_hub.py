"""Model card and Hub upload, against a local HTTP server that stands in for the Hub (HF_ENDPOINT).

The server records every request: the tests assert which files were uploaded (the allow-list only:
no checkpoint folder, no optimizer state, no logs), that the token never appears in anything sent
or written, that the repo was created private, and that a transient failure is retried.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_config, run_train

TOKEN = "hf_WhisperFtTestToken0123456789abcdef"
EXPECTED = {"README.md", "config.json", "generation_config.json", "model.safetensors", "processor_config.json",
            "preprocessor_config.json",
            "tokenizer.json", "tokenizer_config.json"}


class FakeHub:
    """The few Hub API routes huggingface_hub uses to create a repo and commit small files."""

    def __init__(self, fail_first: dict[str, int] | None = None, status: int = 503):
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.files: dict[str, bytes] = {}
        self.fail_first, self.status = dict(fail_first or {}), status
        self.whoami = {"name": "tester", "type": "user", "orgs": []}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.handle_any("GET")

            def do_POST(self):
                self.handle_any("POST")

            def reply(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append((method, self.path, dict(self.headers), body))
                path = self.path.split("?")[0]
                for fragment, n in hub.fail_first.items():
                    if fragment in path and n > 0:
                        hub.fail_first[fragment] = n - 1
                        return self.reply(hub.status, {"error": "fake hub: failing on purpose"})
                if path.startswith("/api/whoami"):
                    return self.reply(200, hub.whoami)
                if path == "/api/repos/create":
                    req = json.loads(body)
                    return self.reply(200, {"url": f"{hub.url}/{req.get('organization')}/{req['name']}"})
                if path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:  # every file as a regular (inline) upload: no LFS round trip
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                            "pullRequestUrl": None})
                return self.reply(404, {"error": f"fake hub: no route for {method} {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}

    def paths(self, fragment: str) -> list[str]:
        return [p for _, p, _, _ in self.requests if fragment in p]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pushed(tiny_model, tmp_path_factory):
    """A 2-step run with push_to_hub, whose first create-repo request gets a 503 (a transient failure)."""
    tmp = tmp_path_factory.mktemp("hub")
    hub = FakeHub(fail_first={"/api/repos/create": 1})
    out = tmp / "run"
    cfg = base_config(tiny_model, out, max_steps=2, save_steps=1, eval_steps=2, eval_at_start=True,
                      predict_with_generate=True, generation_max_length=8, metric_for_best_model="wer",
                      report_to="tensorboard", push_to_hub=True, hub_model_id="tester/tiny-whisper", hub_private=True)
    proc = run_train(cfg, tmp, env=hub.env())
    yield hub, out, proc
    hub.close()


def test_push_uploads_the_allow_list_only(pushed):
    hub, out, proc = pushed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"uploaded to {hub.url}/tester/tiny-whisper" in proc.stderr
    assert (out / "checkpoint-2").is_dir() and (out / "runs").is_dir() and (out / "metrics.jsonl").is_file()
    assert set(hub.files) == EXPECTED
    assert not [f for f in hub.files if f.startswith(("checkpoint-", "runs/")) or "optimizer" in f
                or "random_states" in f or f in ("metrics.jsonl", "config.yaml")]
    assert hub.files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert len(hub.paths("/commit/")) == 1  # one commit: the model is never half-uploaded


def test_repo_is_created_private_and_a_transient_failure_is_retried(pushed):
    hub, _, proc = pushed
    creates = [json.loads(b) for _, p, _, b in hub.requests if p == "/api/repos/create"]
    assert len(creates) == 2  # the 503, then the retry
    assert creates[-1]["name"] == "tiny-whisper" and creates[-1]["organization"] == "tester"
    assert creates[-1].get("visibility") == "private" or creates[-1].get("private") is True


def test_the_token_is_used_but_never_sent_in_content_or_written(pushed):
    hub, out, proc = pushed
    auth = [h.get("Authorization") or h.get("authorization") for _, _, h, _ in hub.requests]
    assert f"Bearer {TOKEN}" in auth  # it authenticated: the assertions below are not vacuous
    assert all(TOKEN.encode() not in content for content in hub.files.values())
    assert all(TOKEN.encode() not in body for _, _, _, body in hub.requests)
    assert TOKEN not in proc.stdout + proc.stderr
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 10 and all(TOKEN.encode() not in p.read_bytes() for p in written)


def test_uploaded_card_has_model_index_and_no_local_path(pushed, tiny_model):
    hub, out, _ = pushed
    card = hub.files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in meta  # a local starting folder is no Hub id: the Hub would reject it
    assert str(tiny_model) not in card and str(out) not in card
    assert 'model="tester/tiny-whisper"' in card
    index = meta["model-index"]
    assert [m["type"] for m in index[0]["results"][0]["metrics"]] == ["wer", "cer", "wer"]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_wer" in line]
    final = [r for r in evals if r["step"] == 2][-1]
    assert index[0]["results"][0]["metrics"][1]["value"] == round(final["eval_cer"], 2)
    assert "base model" in index[1]["name"]
    assert index[1]["results"][0]["metrics"][0]["value"] == round(evals[0]["eval_wer"], 2)
    local = (out / "README.md").read_text()
    local_meta = yaml.safe_load(local.split("---\n")[1])
    assert "base_model" not in local_meta and str(tiny_model) not in local  # no local path, not even locally
    assert "Fine-tuned from a local model (`model`)" in local


def _push_in_subprocess(folder: Path, hub: FakeHub, tmp: Path, **settings) -> subprocess.CompletedProcess:
    cfg = {"lang": "en", "whisper_pretrained": "openai/whisper-tiny", "checkpoint_dir": str(folder),
           "checkpoint_name": "tiny-en", **settings}
    path = tmp / "push.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = "\n".join([
        "import sys", "from pathlib import Path", "from whisper_ft import hub",
        "from whisper_ft.config import load_config",
        "try:", "    print(hub.push(Path(sys.argv[1]), load_config(['--config', sys.argv[2]])))",
        "except hub.HubError as e:", "    print(e, file=sys.stderr)", "    sys.exit(1)"])
    return subprocess.run([sys.executable, "-c", code, str(folder), str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **hub.env()})


@pytest.mark.slow
def test_refused_token_fails_at_once_with_advice(tiny_model, tmp_path):
    """401 is not transient: one attempt, a message that says what to do, and the token masked."""
    hub = FakeHub(fail_first={"/api/repos/create": 5}, status=401)
    try:
        proc = _push_in_subprocess(tiny_model, hub, tmp_path, hub_model_id="tester/x")
    finally:
        hub.close()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "could not create the repo tester/x" in proc.stderr and "hf auth login" in proc.stderr
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    assert len(hub.paths("/api/repos/create")) == 1 and not hub.files


@pytest.mark.slow
def test_default_repo_is_the_users(tiny_model, tmp_path):
    hub = FakeHub()
    try:
        proc = _push_in_subprocess(tiny_model, hub, tmp_path)
    finally:
        hub.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"{hub.url}/tester/tiny-en"
    assert hub.paths("/api/whoami") and set(hub.files) <= EXPECTED and "model.safetensors" in hub.files


def test_a_checkpoint_folder_is_never_pushed(tmp_path):
    """Raw training state (no config.json) is refused before anything reaches the network
    (DESIGN: tied output projection)."""
    from whisper_ft import hub
    from whisper_ft.config import load_config

    state_only = tmp_path / "checkpoint-3"
    state_only.mkdir()
    for name in ("model.safetensors", "optimizer.bin", "trainer_state.json"):
        (state_only / name).write_bytes(b"x")
    with pytest.raises(hub.HubError, match="holds no exported model"):
        hub.push(state_only, load_config(["--hf-token", "x", "--hub-model-id", "a/b"], env={}))


def test_model_card_reports_the_exported_steps_metrics(tmp_path):
    """load_best_model_at_end exports the best step: the card must show that step's numbers, not the last."""
    from whisper_ft import hub
    from whisper_ft.config import load_config
    from whisper_ft.languages import resolve

    rows = [{"step": 0, "eval_loss": 5.0, "eval_wer": 90.0, "eval_cer": 50.0, "eval_wer_ortho": 95.0},
            {"step": 10, "loss": 3.0},
            {"step": 10, "eval_loss": 2.0, "eval_wer": 30.0, "eval_cer": 10.0, "eval_wer_ortho": 40.0},
            {"step": 20, "eval_loss": 2.5, "eval_wer": 35.0, "eval_cer": 12.0, "eval_wer_ortho": 45.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(["--lang", "as", "--dataset-name", "google/fleurs", "--dataset-config", "as_in",
                       "--checkpoint-dir", str(tmp_path)], env={})
    state = {"step": 20, "best_step": 10, "best_metric": 30.0, "samples_seen": 640, "audio_seconds_seen": 7200.0,
             "base_metrics": rows[0], "bad": {"counts": {"missing file": 2}}}
    card = hub.write_model_card(tmp_path, cfg, resolve("as"), state).read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "openai/whisper-small" and meta["datasets"] == ["google/fleurs"]
    assert meta["language"] == ["as"]
    fine, base = meta["model-index"]
    assert [m["value"] for m in fine["results"][0]["metrics"]] == [30.0, 10.0, 40.0]
    assert [m["value"] for m in base["results"][0]["metrics"]] == [90.0, 50.0, 95.0]
    assert fine["results"][0]["dataset"] == {"name": "google/fleurs", "type": "google/fleurs", "config": "as_in",
                                             "split": "validation", "args": {"language": "as"}}
    assert "2.00 hours of audio" in card and "2 unusable samples skipped: 2 missing file" in card
    assert "| WER, normalised (%) | 90.00 | 30.00 |" in card and "this model (step 10)" in card
    assert "transformers " in card and "torch " in card and "accelerate " in card


def test_a_model_card_the_disk_has_no_room_for_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    """The model is whole when the card is written: a full disk then is said, and the run still ends well."""
    from whisper_ft import hub
    from whisper_ft.config import load_config
    from whisper_ft.languages import resolve
    from whisper_ft.state import RunState

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "write_model_card", full)
    cfg = load_config(["--lang", "en", "--checkpoint-dir", str(tmp_path)], env={})
    said = []
    assert hub.publish(cfg, resolve("en"), RunState.fresh(cfg), tmp_path, said.append) is None
    assert any("could not write the model card" in s and "No space left on device" in s and "free under" in s
               for s in said), said
    assert said[-1].startswith("final model:")


def test_a_language_without_spaces_is_reported_by_cer(tmp_path):
    """In Chinese WER counts a whole sentence as one word: the Hub's model-index gets CER alone, and the card's
    tables lead with it."""
    from whisper_ft import hub
    from whisper_ft.config import load_config
    from whisper_ft.languages import resolve

    rows = [{"step": 0, "eval_loss": 5.0, "eval_wer": 100.0, "eval_cer": 60.0, "eval_wer_ortho": 100.0,
             "eval/cv/wer": 100.0, "eval/cv/cer": 60.0, "eval/cv/loss": 5.0},
            {"step": 10, "eval_loss": 2.0, "eval_wer": 90.0, "eval_cer": 20.0, "eval_wer_ortho": 95.0,
             "eval/cv/wer": 90.0, "eval/cv/cer": 20.0, "eval/cv/loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(["--lang", "zh", "--checkpoint-dir", str(tmp_path), "--metric-for-best-model", "cer",
                       "--eval-sets", "{cv: {split: test}}"], env={})
    card = hub.write_model_card(tmp_path, cfg, resolve("zh"), {"step": 10, "best_step": 10}).read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    fine, base = meta["model-index"]
    assert meta["metrics"] == ["cer"]
    assert [(m["type"], m["value"]) for m in fine["results"][0]["metrics"]] == [("cer", 20.0)]
    assert [(m["type"], m["value"]) for m in base["results"][0]["metrics"]] == [("cer", 60.0)]
    results = card.split("## Results")[1]
    assert results.index("| CER, normalised (%) | 60.00 | 20.00 |") < results.index("| WER, normalised (%) |")
    assert "written without spaces" in results
    assert "| CER base | CER this model |" in results and "| 60.00 | 20.00 | 5.00 | 2.00 |" in results


def test_worse_than_base_is_said_plainly_with_advice(tmp_path):
    from whisper_ft import hub
    from whisper_ft.config import load_config
    from whisper_ft.languages import resolve

    cfg = load_config(["--lang", "en", "--checkpoint-dir", str(tmp_path), "--learning-rate", "3e-4"], env={})
    base, better, worse = ({"step": s, "eval_wer": w, "eval_loss": l} for s, w, l in ((0, 20.0, 2.0),
                                                                                      (10, 15.0, 1.0), (10, 25.0, 1.0)))
    assert hub.worse_than_base(cfg, base, better) is None
    assert hub.worse_than_base(cfg, base, dict(better, eval_wer=20.0)) is None  # equal is not worse
    assert hub.worse_than_base(cfg, {}, worse) is None  # no base evaluation: nothing to compare
    msg = hub.worse_than_base(cfg, base, worse)
    assert "worse than the base model" in msg and "wer 20.00 before" in msg and "25.00 after" in msg
    assert "lower learning_rate (now 0.0003; e.g. 0.0001)" in msg and "max_steps" in msg and "data" in msg
    loss_cfg = load_config(["--lang", "en", "--metric-for-best-model", "loss"], env={})
    assert hub.worse_than_base(loss_cfg, base, worse) is None  # by loss it improved (2.0 -> 1.0)
    greater = load_config(["--lang", "en", "--greater-is-better"], env={})
    assert hub.worse_than_base(greater, base, better) is not None  # a metric where larger is better fell
    rows = [base, worse]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = {"step": 10, "best_step": 10, "best_metric": 25.0, "base_metrics": base}
    card = hub.write_model_card(tmp_path, cfg, resolve("en"), state).read_text()
    assert "**Warning:** the fine-tuned model is worse than the base model" in card
    assert "sf.read(" in card and "FFmpeg" in card  # the usage example decodes audio itself
    card_ok = hub.model_card(cfg, resolve("en"), {**state, "best_metric": 15.0}, [base, better])
    assert "Warning" not in card_ok


def test_upload_list_adds_tensorboard_logs_only_when_asked(tmp_path):
    from whisper_ft import hub

    for name in ("config.json", "model.safetensors", "README.md", "config.yaml", "metrics.jsonl"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "events.out.tfevents.1").write_text("x")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "config.json").write_text("{}")
    names = lambda files: sorted(p.relative_to(tmp_path).as_posix() for p in files)  # noqa: E731
    assert names(hub.upload_list(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    assert names(hub.upload_list(tmp_path, logs=True))[-1] == "runs/events.out.tfevents.1"


# ---------------------------------------------------------------------------------------------
# The token, checked before training


def whoami_info(role, scoped=None):
    token = {"displayName": "t", "role": role}
    if scoped is not None:
        token["fineGrained"] = {"scoped": scoped, "global": []}
    return {"name": "tester", "type": "user", "auth": {"type": "access_token", "accessToken": token}}


@pytest.mark.parametrize("info,namespace,ok", [
    (whoami_info("write"), "tester", True),
    (whoami_info("read"), "tester", False),
    (whoami_info("fineGrained", [{"entity": {"type": "user", "name": "tester"},
                                  "permissions": ["repo.content.read", "repo.write"]}]), "tester", True),
    (whoami_info("fineGrained", [{"entity": {"type": "user", "name": "tester"},
                                  "permissions": ["repo.content.read"]}]), "tester", False),
    (whoami_info("fineGrained", [{"entity": {"type": "user", "name": "tester"},
                                  "permissions": ["repo.write"]}]), "some-org", False),
    ({"name": "tester", "type": "user"}, "tester", True),  # no token details (OAuth): the upload will tell
])
def test_write_permission_decision(info, namespace, ok):
    from whisper_ft.hub import can_write

    assert can_write(info, namespace)[0] is ok


def test_check_token_offline_online_and_refused():
    from types import SimpleNamespace

    from whisper_ft.hub import HubError, check_token

    cfg = SimpleNamespace(push_to_hub=True, hf_token=TOKEN, hub_model_id="", checkpoint_name="x")
    assert "could not be verified" in check_token(cfg, offline=True, whoami=lambda: 1 / 0)
    assert check_token(SimpleNamespace(push_to_hub=False), offline=False, whoami=lambda: 1 / 0) is None
    assert "verified: it can write to tester" in check_token(cfg, offline=False, whoami=lambda: whoami_info("write"))
    with pytest.raises(HubError, match="cannot upload to tester: it is a read-only token"):
        check_token(cfg, offline=False, whoami=lambda: whoami_info("read"))
    with pytest.raises(HubError, match="cannot upload to my-org: this fine-grained token has no repo.write"):
        check_token(SimpleNamespace(push_to_hub=True, hf_token=TOKEN, hub_model_id="my-org/m", checkpoint_name="x"),
                    offline=False, whoami=lambda: whoami_info("fineGrained", []))

    class Refused(Exception):
        response = SimpleNamespace(status_code=401)

    def refuse():
        raise Refused(f"401 Unauthorized for token {TOKEN}")

    with pytest.raises(HubError) as err:
        check_token(cfg, offline=False, whoami=refuse)
    assert "did not accept the token" in str(err.value) and TOKEN not in str(err.value)


@pytest.mark.slow
def test_read_only_token_stops_before_the_model_loads(tmp_path):
    """Online, against the stand-in Hub: whoami says read-only, so the run ends in seconds, not after training."""
    hub = FakeHub()
    hub.whoami = whoami_info("read")
    try:
        cfg = {"push_to_hub": True, "whisper_pretrained": "/nonexistent/whisper", "checkpoint_dir": str(tmp_path / "o"),
               "lang": "en", "fp16": False}
        proc = run_train(cfg, tmp_path, env=hub.env())
    finally:
        hub.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the Hub token of tester cannot upload to tester: it is a read-only token" in proc.stderr
    assert "/nonexistent/whisper" not in proc.stderr and TOKEN not in proc.stderr and "Traceback" not in proc.stderr
    assert hub.paths("/api/whoami") and not hub.paths("/api/repos/create")
