"""Every example workflow loads in the real frontend without missing nodes, and its API form runs on CPU.

The API form is what the real frontend's app.graphToPrompt() produces from the loaded file; only the
checkpoint name (a random-weight SD1.5 checkpoint, tools/checkpoint_factory.py), the latent size and the step
count are changed so it runs in seconds on CPU. Each run's PNG must carry the "comfy_accel" metadata.
"""
import copy
import json
from pathlib import Path

import pytest

from tests.web.harness import (Browser, artifacts_dir, graph_to_api, load_workflow, require_browser,
                               start_server)
from tools.comfy_host import REPO_ROOT

pytestmark = pytest.mark.browser
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
PACK = "comfy_accel"
CHECKPOINT = "accel_random_sd15.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    from tools.checkpoint_factory import ensure_checkpoint

    server = start_server(tmp_path_factory, "workflows", with_test_nodes=False)
    checkpoints = Path(server.base) / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / CHECKPOINT).symlink_to(ensure_checkpoint())
    try:  # the Tiny VAE workflow decodes with TAESD files (random weights: none can be downloaded here)
        from tools.taesd_factory import write_taesd_files

        write_taesd_files(Path(server.base) / "models" / "vae_approx", "sd")
    except ImportError:
        pass
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(server, artifacts_dir):
    browser = Browser(server.url, artifacts_dir_for(artifacts_dir))
    browser.open()
    yield browser
    browser.close()


def artifacts_dir_for(root):
    return artifacts_dir(root, "workflows")


def for_cpu(prompt: dict) -> dict:
    """The same graph, on the random checkpoint, 64×64 and 3 steps."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=1)
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = 3
    return prompt


def saved_pngs(server, entry):
    out = []
    for node_output in entry["outputs"].values():
        for image in node_output.get("images", []):
            if image.get("type") == "output":
                out.append(Path(server.base) / "output" / image["subfolder"] / image["filename"])
    return out


def test_examples_exist_and_are_listed_as_templates(server):
    names = {p.stem for p in EXAMPLES}
    assert "cfg_cutoff" in names
    listed = server.get("/workflow_templates")
    assert set(listed.get(PACK, [])) == names, listed
    for path in EXAMPLES:
        assert server.get(f"/api/workflow_templates/{PACK}/{path.name}") == json.loads(path.read_text())


def png_entry(path: Path, key: str):
    from PIL import Image

    with Image.open(path) as image:
        raw = image.text.get(key)
    return json.loads(raw) if raw else None


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads_without_missing_nodes_and_runs_on_cpu(server, browser, path):
    workflow = server.get(f"/api/workflow_templates/{PACK}/{path.name}")
    missing = load_workflow(browser.page, workflow)
    assert missing == [], f"{path.name}: the frontend reports missing node types {missing}"
    browser.shot(f"{path.stem}-loaded", fit=True)
    prompt = for_cpu(graph_to_api(browser.page))
    pack_nodes = {k for k, v in prompt.items() if v["class_type"].startswith("Accel")}
    assert pack_nodes, f"{path.name} uses no comfy-accel node"

    entry = server.wait_history(server.post("/prompt", {"prompt": prompt, "client_id": "workflow-test",
                                                        "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
                                            )["prompt_id"], timeout=240)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pngs = saved_pngs(server, entry)
    assert pngs and all(p.is_file() for p in pngs)
    meta = png_entry(pngs[0], "comfy_accel")
    assert meta is not None, "the saved PNG has no comfy_accel entry"
    assert set(meta["requested"]) == pack_nodes
    # every pack node that patches the MODEL is reported with what actually ran (VAE nodes: as requested)
    info = server.get("/object_info")
    model_nodes = {k for k in pack_nodes if "MODEL" in info[prompt[k]["class_type"]]["output"]}
    assert model_nodes <= {e["node"] for e in meta["in_effect"].values()}, meta
    for key, effect in meta["in_effect"].items():
        assert key in meta["applied"] and effect["node"] in pack_nodes and effect["used"], (key, effect)
    assert png_entry(pngs[0], "workflow")["nodes"], "the workflow itself is still embedded"
