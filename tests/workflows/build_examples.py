"""Writes example_workflows/*.json with the real frontend: nodes are created, wired and serialized by it.

The workflows are specs below (node type, widget values by name, links); the real ComfyUI frontend creates
each node from the server's node definitions, so widget order, sizes and link records are exactly what a
person saving the workflow would get. Run after a node's inputs change:

    .venv/bin/python -m tests.workflows.build_examples            # all
    .venv/bin/python -m tests.workflows.build_examples fastest    # some
A spec whose nodes are not registered in this install is reported and left as it is on disk.
"""
from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "example_workflows"
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CHECKPOINT_URL = "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/" + CHECKPOINT
POSITIVE = "a lighthouse on a cliff at sunset, dramatic clouds, detailed, 35mm photo"
NEGATIVE = "blurry, lowres, watermark, text"


def base(model_from: str, vae_from=("1", 2), prefix="comfy-accel/example", extra=None, sampler=None):
    """Checkpoint → prompts → KSampler → VAE Decode → Save Image, the model taken from `model_from`."""
    nodes = [
        ("1", "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, {}),
        ("2", "CLIPTextEncode", {"text": POSITIVE}, {"clip": ("1", 1)}),
        ("3", "CLIPTextEncode", {"text": NEGATIVE}, {"clip": ("1", 1)}),
        ("4", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}),
        ("5", "KSampler", {"seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 7.0,
                           "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0, **(sampler or {})},
         {"model": model_from, "positive": ("2", 0), "negative": ("3", 0), "latent_image": ("4", 0)}),
        ("6", "VAEDecode", {}, {"samples": ("5", 0), "vae": vae_from}),
        ("7", "SaveImage", {"filename_prefix": prefix}, {"images": ("6", 0)}),
    ]
    return nodes + list(extra or [])


def accelerated(prefix, *pieces, vae_from=("1", 2)):
    """The base workflow with `pieces` (id, type, widgets) chained on the MODEL between loader and sampler."""
    extra, source = [], ("1", 0)
    for node_id, node_type, widgets in pieces:
        extra.append((node_id, node_type, widgets, {"model": source}))
        source = (node_id, 0)
    return base(source, vae_from=vae_from, prefix=f"comfy-accel/{prefix}", extra=extra)


CUTOFF = ("10", "AccelCFGCutoff", {"cutoff_percent": 60.0, "sigma_threshold": 0.0})
DEEPCACHE = ("11", "AccelDeepCache", {"cache_interval": 3, "cache_branch": 0, "start_percent": 0.0,
                                      "end_percent": 100.0})
COMPILE = ("12", "AccelAccelerateModel", {"backend": "auto"})  # inductor+cudagraphs on a GPU, inductor on a CPU
TINY_VAE = ("13", "AccelTinyVAE", {"vae_family": "auto"}, {"model": ("1", 0)})

WORKFLOWS = {
    "cfg_cutoff": {
        "title": "CFG Cutoff: skip the negative prompt for the last 40% of the steps",
        "nodes": accelerated("cfg_cutoff", CUTOFF),
    },
    "deepcache": {
        "title": "DeepCache: a full UNet pass every 3rd step, the shallow blocks in between",
        "nodes": accelerated("deepcache", DEEPCACHE),
    },
    "tiny_vae": {
        "title": "Tiny VAE: decode with TAESD (models/vae_approx/taesd_decoder.*)",
        "nodes": accelerated("tiny_vae", vae_from=("13", 0)) + [TINY_VAE],
    },
    "accelerate_model": {
        "title": "Accelerate Model: the fastest compile backend here (auto), compiled artifacts kept in the cache",
        "nodes": accelerated("accelerate_model", COMPILE),
    },
    "tensorrt": {
        "title": "TensorRT: build (or load from the cache) an engine, falling back to eager where TensorRT is missing",
        "nodes": accelerated("tensorrt", ("12", "AccelAccelerateModel", {"backend": "tensorrt"})),
    },
    "fastest": {
        "title": "Fastest: CFG cutoff + DeepCache + compiled UNet + Tiny VAE",
        "nodes": accelerated("fastest", CUTOFF, DEEPCACHE, COMPILE, vae_from=("13", 0)) + [TINY_VAE],
    },
}


def layout(spec_nodes):
    """Left-to-right columns by dependency depth."""
    depth = {}

    def d(node_id):
        if node_id not in depth:
            node = next(n for n in spec_nodes if n[0] == node_id)
            depth[node_id] = 1 + max([d(src) for src, _ in node[3].values()], default=-1)
        return depth[node_id]

    rows: dict[int, int] = {}
    pos = {}
    for node in spec_nodes:
        col = d(node[0])
        pos[node[0]] = [40 + 380 * col, 60 + 260 * rows.get(col, 0)]
        rows[col] = rows.get(col, 0) + 1
    return pos


BUILD_JS = """async ({spec, pos, title, modelUrl, checkpoint}) => {
  app.graph.clear();
  const made = {};
  for (const [id, type, widgets] of spec) {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error("node type not registered: " + type);
    node.id = +id;
    node.pos = pos[id];
    app.graph.add(node);
    for (const [name, value] of Object.entries(widgets)) {
      const widget = node.widgets?.find(w => w.name === name);
      if (!widget) throw new Error(type + " has no widget " + name);
      widget.value = value;
    }
    if (type === "CheckpointLoaderSimple")
      node.properties.models = [{ name: checkpoint, url: modelUrl, directory: "checkpoints" }];
    made[id] = node;
  }
  for (const [id, type, widgets, inputs] of spec) {
    for (const [name, [src, slot]] of Object.entries(inputs)) {
      const target = made[id];
      const index = target.inputs.findIndex(i => i.name === name);
      if (index < 0) throw new Error(type + " has no input " + name);
      made[src].connect(slot, target, index);
    }
  }
  const wf = app.graph.serialize();
  wf.extra = { ...(wf.extra || {}), comfy_accel: { title } };
  return wf;
}"""


def without_nulls(value):
    """The serializer writes every unset slot property as null; the frontend treats absent the same."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def build(names=None):
    from tests.web.harness import Browser, start_server

    class Factory:  # tmp_path_factory stand-in for the script
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name))

    server = start_server(Factory(), "build-examples", with_test_nodes=False)
    server.start()
    browser = Browser(server.url, Path(tempfile.mkdtemp()))
    try:
        browser.open()
        registered = set(server.get("/object_info"))
        OUT.mkdir(exist_ok=True)
        for name, spec in WORKFLOWS.items():
            if names and name not in names:
                continue
            missing = sorted({n[1] for n in spec["nodes"]} - registered)
            if missing:
                print(f"skip {name}: not registered here: {', '.join(missing)}")
                continue
            wf = browser.page.evaluate(BUILD_JS, {"spec": spec["nodes"], "pos": layout(spec["nodes"]),
                                                  "title": spec["title"], "modelUrl": CHECKPOINT_URL,
                                                  "checkpoint": CHECKPOINT})
            wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfy-accel/example_workflows/{name}"))
            (OUT / f"{name}.json").write_text(json.dumps(without_nulls(wf), indent=1) + "\n")
            print(f"wrote {OUT / (name + '.json')}")
    finally:
        browser.close()
        server.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    build(sys.argv[1:] or None)
