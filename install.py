"""Run by ComfyUI-Manager (`python install.py` in the pack folder) and by the AUTOMATIC1111 WebUI at start-up.

It installs nothing heavy: torch belongs to the host and the accelerators are optional. It only makes sure
the few light requirements are present, with the host's own installer when the WebUI runs it.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")


def missing_requirements() -> list[str]:
    names = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        module = line.split("=")[0].split("<")[0].split(">")[0].strip().replace("-", "_")
        if importlib.util.find_spec(module) is None:
            names.append(line)
    return names


def main() -> int:
    missing = missing_requirements()
    if not missing:
        print("[comfy-accel] requirements present")
        return 0
    try:
        import launch  # the WebUI's installer module, only importable when the WebUI runs us

        for name in missing:
            launch.run_pip(f"install {name}", f"comfy-accel requirement: {name}")
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *missing])
    return 0


if __name__ == "__main__":
    sys.exit(main())
