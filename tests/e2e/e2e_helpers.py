"""A real ComfyUI server for the end-to-end tests: its base folder, its process and its HTTP API.

Opt-in: COMFYUI_DIR names a ComfyUI checkout (0.8.0 or newer) and COMFYUI_PYTHON the Python that
runs it (default: the one running pytest). Without COMFYUI_DIR every e2e test is skipped.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLE_WORKFLOWS = os.path.join(PACK_ROOT, "example_workflows")
LAUNCHER = os.path.join(HERE, "comfy_launcher.py")
PROBE_NODE = os.path.join(HERE, "probe_node.py")

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
SKIP_REASON = ("end-to-end tests against a real ComfyUI are opt-in: set COMFYUI_DIR to a ComfyUI checkout "
               "(and COMFYUI_PYTHON to the Python that runs it)") if not COMFYUI_DIR else None

# The file names the example workflows use; the tests put the tiny transformer and text encoder there,
# and a full-size Flux VAE (random weights) as ae.safetensors: ComfyUI's native VAELoader, which two of
# the examples use, accepts nothing smaller, and our own loader and lazy decode take it too.
OFFICIAL_NAMES = {"transformer": ("diffusion_models", "z_image_turbo_bf16.safetensors"),
                  "text_encoder": ("text_encoders", "qwen_3_4b.safetensors"),
                  "vae": ("vae", "ae.safetensors")}
# Where the extra_model_paths.yaml test keeps the tiny models (by OFFICIAL_NAMES key): a folder outside
# ComfyUI's base folder, subfolders and file names of its own, found only through the yaml.
EXTRA_NAMES = {"transformer": ("zi_dit", "zi_tiny.safetensors"),
               "text_encoder": ("zi_te", "zi_tiny_qwen3.safetensors"),
               "vae": ("zi_vae", "zi_tiny_vae.safetensors")}
# The input image the img2img example loads (ComfyUI ships an input/example.png of its own; the test
# base folder gets a small one under that name).
INPUT_IMAGE = "example.png"
INPUT_SIZE = (64, 64)
# The pack's folder name in the test base folder's custom_nodes (a symlink to this checkout).
PACK_FOLDER = "zimage-nodes"
OUR_NODES = ("ZImageShardedLoader", "ZImageTextEncode", "ZImageSampler", "ZImageVAEDecodeLazy")

STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 180.0
_seeds = itertools.count(int(time.time()) % 100_000 * 1000)


def unique_seed() -> int:
    """A seed no other run of this session used: ComfyUI serves an unchanged prompt from its cache."""
    return next(_seeds)


def check_comfyui_dir() -> str:
    main_py = os.path.join(COMFYUI_DIR, "main.py")
    if not os.path.isfile(main_py):
        raise RuntimeError(f"COMFYUI_DIR={COMFYUI_DIR!r} is not a ComfyUI checkout: {main_py} does not exist")
    return os.path.abspath(COMFYUI_DIR)


def write_full_size_vae(path: str) -> str:
    """A full-size Flux VAE (the ae.safetensors layout: original key names, bf16) with random weights."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from zimage_nodes.loaders.model_detection import scaffold_config
    from zimage_nodes.loaders.tiny_models import original_vae_state

    config = scaffold_config("vae")
    levels = len(config["block_out_channels"])
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["latent_channels"] == 16
    torch.manual_seed(0)
    vae = AutoencoderKL(**config).eval()
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}
    save_file(original_vae_state(state, levels), path)
    return path


def write_input_image(base: str) -> str:
    """input/example.png: a small RGB picture (a gradient with a disc) for the img2img example."""
    from PIL import Image, ImageDraw

    w, h = INPUT_SIZE
    image = Image.new("RGB", (w, h))
    image.putdata([(40 + 150 * x // w, 90 + 100 * y // h, 200 - 120 * y // h) for y in range(h) for x in range(w)])
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(220, 110, 40))
    os.makedirs(os.path.join(base, "input"), exist_ok=True)
    path = os.path.join(base, "input", INPUT_IMAGE)
    image.save(path)
    return path


def place_models(root: str, models: dict[str, str], names: dict[str, tuple[str, str]] = OFFICIAL_NAMES) -> str:
    """Symlinks each model (paths by OFFICIAL_NAMES key) as root/<folder>/<name>, folder and name from
    `names` (by the same keys). Returns root."""
    for key, (folder, name) in names.items():
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        os.symlink(models[key], os.path.join(root, folder, name))
    return root


def make_base_dir(base: str, models: dict[str, str] | None) -> str:
    """A ComfyUI base directory: the models (paths by OFFICIAL_NAMES key) under the official names
    (models=None: the model folders empty, as in a fresh install), the img2img example's input image,
    this pack in custom_nodes, the probe node beside it, and the frontend's settings."""
    if models is None:
        for folder, _ in OFFICIAL_NAMES.values():
            os.makedirs(os.path.join(base, "models", folder), exist_ok=True)
    else:
        place_models(os.path.join(base, "models"), models)
    write_input_image(base)
    custom = os.path.join(base, "custom_nodes")
    os.makedirs(custom, exist_ok=True)
    os.symlink(PACK_ROOT, os.path.join(custom, PACK_FOLDER), target_is_directory=True)
    os.makedirs(os.path.join(custom, "zimage_e2e_probe"))
    shutil.copy(PROBE_NODE, os.path.join(custom, "zimage_e2e_probe", "__init__.py"))
    os.makedirs(os.path.join(base, "user", "default"), exist_ok=True)
    with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
        # no first-run tutorial; no minimap or canvas statistics over the screenshot
        json.dump({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}, f)
    return base


def write_extra_model_paths(path: str, base_path: str, folders: dict[str, str], section: str = "zimage_e2e") -> str:
    """An extra_model_paths.yaml (ComfyUI's format: one section with a base_path and, per model kind, a
    folder relative to it) that adds base_path/<folders[kind]> to ComfyUI's search path for each kind."""
    lines = [f"{section}:", f"    base_path: {json.dumps(base_path)}"]  # a JSON string is a YAML scalar
    lines += [f"    {kind}: {json.dumps(folder)}" for kind, folder in folders.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI process on 127.0.0.1, started in its own process group and always stopped."""

    def __init__(self, comfy_dir: str, base_dir: str, log_path: str, extra_args: tuple[str, ...] = ()):
        """extra_args: more main.py arguments (e.g. --extra-model-paths-config PATH). The server's
        stdout and stderr both go to log_path."""
        self.comfy_dir, self.base_dir, self.log_path = comfy_dir, base_dir, log_path
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = os.path.join(base_dir, "output")
        self.proc: subprocess.Popen | None = None

    # --- process -----------------------------------------------------------------------------
    def start(self) -> None:
        cmd = [COMFYUI_PYTHON, LAUNCHER, self.comfy_dir, "--cpu", "--base-directory", self.base_dir,
               "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
               "--listen", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   ZIMAGE_E2E_PARENT_PID=str(os.getpid()))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {self.proc.returncode} while starting:\n"
                                   + self.log_tail())
            try:
                self.get("/object_info", timeout=10)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer {self.url}/object_info within {STARTUP_TIMEOUT_S:.0f} s:\n"
                           + self.log_tail())

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL if it is still there after 15 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()
        self.proc = None

    def log(self) -> str:
        """Everything the server has written to stdout and stderr so far."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return "(no log)"

    def log_tail(self, chars: int = 6000) -> str:
        return self.log()[-chars:]

    # --- HTTP ----------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data else None

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id. A prompt that fails validation raises with ComfyUI's answer."""
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            answer = self.post("/prompt", body)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"ComfyUI refused the prompt ({err.code}): {err.read().decode(errors='replace')}")
        assert not answer.get("node_errors"), answer
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        """Poll /history/{id} until the run has finished (either way); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("ComfyUI died during the run:\n" + self.log_tail())
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n" + self.log_tail())

    def run(self, prompt: dict, timeout: float = RUN_TIMEOUT_S) -> dict:
        return self.wait(self.queue(prompt), timeout)


@contextlib.contextmanager
def running(server: ComfyServer):
    """Starts the server; stops it on leaving the block, whatever happened."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


# nodes.py's init_external_custom_nodes logs, after importing every custom node:
#   Import times for custom nodes:
#      0.1 seconds: /base/custom_nodes/zimage-nodes
#      0.0 seconds (IMPORT FAILED): /base/custom_nodes/broken
_IMPORT_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?) seconds( \(IMPORT FAILED\))?: (.+?)\s*$")


def import_times(log: str) -> dict[str, tuple[float, bool]]:
    """The 'Import times for custom nodes' block of a ComfyUI log: module path -> (seconds as printed,
    whether the import failed). Empty when the log has no such block."""
    lines = log.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Import times for custom nodes:")
    except StopIteration:
        return {}
    out = {}
    for line in lines[start + 1:]:
        match = _IMPORT_TIME.match(line)
        if not match:
            break
        out[match.group(3)] = (float(match.group(1)), bool(match.group(2)))
    return out


def messages(entry: dict) -> dict[str, list[dict]]:
    """A history entry's status messages by type (execution_start, execution_error, ...)."""
    out: dict[str, list[dict]] = {}
    for kind, data in entry.get("status", {}).get("messages", []):
        out.setdefault(kind, []).append(data)
    return out


def describe(entry: dict) -> str:
    """The parts of a history entry that say why a run failed, for assertion messages."""
    msgs = messages(entry)
    errors = [{k: e.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")}
              | {"traceback": "".join(e.get("traceback", []))[-3000:]} for e in msgs.get("execution_error", [])]
    return json.dumps({"status": entry.get("status", {}).get("status_str"), "errors": errors,
                       "interrupted": msgs.get("execution_interrupted"), "outputs": entry.get("outputs")}, indent=1)


def saved_image(server: ComfyServer, entry: dict, node: str):
    """The one PNG a SaveImage node wrote in this run, opened with PIL."""
    from PIL import Image

    images = entry["outputs"].get(node, {}).get("images", [])
    assert len(images) == 1, describe(entry)
    img = images[0]
    assert img["type"] == "output", img
    path = os.path.join(server.output_dir, img["subfolder"], img["filename"])
    assert os.path.isfile(path), f"{path} was reported but not written"
    return Image.open(path)


def load_workflow(name: str) -> dict:
    with open(os.path.join(EXAMPLE_WORKFLOWS, name)) as f:
        return json.load(f)


def to_api(workflow: dict, object_info: dict) -> dict:
    """UI-format workflow -> API prompt, as the frontend's graphToPrompt does (comfy-cli's port of it)."""
    from comfy_cli.workflow_to_api import convert_ui_to_api

    prompt = convert_ui_to_api(workflow, object_info)
    return {node_id: {k: v for k, v in node.items() if k != "_meta"} for node_id, node in prompt.items()}


def node_id(prompt: dict, class_type: str) -> str:
    ids = [i for i, n in prompt.items() if n["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type} node in the prompt, found {ids}"
    return ids[0]


def shrink(prompt: dict, size: int = 64, steps: int = 2) -> dict:
    """Small and quick for a CPU: size x size pixels (for an empty latent; an encoded image keeps the
    input image's size), `steps` steps, a fresh seed."""
    for node in prompt.values():
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=size, height=size)
    sampler = prompt[node_id(prompt, "ZImageSampler")]["inputs"]
    sampler.update(steps=steps, seed=unique_seed())
    return prompt
