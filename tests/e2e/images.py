"""Container images for the one-node cluster mode, written here as OCI layout
tarballs (there is no registry and no Docker engine) and imported with
`ctr -n k8s.io images import`.

The webhook's image is read off the Dockerfile's final stage: every
instruction there is either modelled below or makes `webhook_image` raise, so
the Dockerfile cannot drift from what the cluster tests run. The binary is the
one `scripts/build-static.sh` builds, the same script the Dockerfile's build
stage runs.

Stand-in: the Dockerfile's base, gcr.io/distroless/static-debian12:nonroot,
cannot be pulled here. `distroless_stand_in` gives the files of it the binary
can touch (the nonroot user in /etc/passwd and /etc/group, /tmp, the nonroot
home); distroless's CA certificates and time zones are absent, and nothing in
the binary reads them (in-cluster config carries its own CA).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shlex
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Entry:
    """One file or directory of a layer."""
    path: str  # absolute, in the image
    data: bytes | None = None  # None: a directory
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass
class Image:
    name: str
    layers: list[list[Entry]]
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    env: list[str] = field(default_factory=lambda: [PATH_ENV])
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)
    workdir: str = ""

    def paths(self) -> set[str]:
        return {e.path for layer in self.layers for e in layer}


def distroless_stand_in() -> list[Entry]:
    passwd = b"root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n" \
             b"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
    group = b"root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n"
    return [Entry("/etc", None), Entry("/etc/passwd", passwd, 0o644), Entry("/etc/group", group, 0o644),
            Entry("/tmp", None, 0o1777), Entry("/home", None), Entry("/home/nonroot", None, 0o700, 65532, 65532)]


def _exec_form(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    raise ValueError(f"only the exec form is modelled, not {text!r}")


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The final stage's instructions, (keyword, arguments), continuation
    lines joined and comments dropped."""
    logical, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages = [i for i, line in enumerate(logical) if line.split()[0].upper() == "FROM"]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical[stages[-1]:]]


def webhook_image(dockerfile: Path, repo: Path, binary: Path, name: str) -> Image:
    """The image the Dockerfile's final stage describes, with `binary` as the
    build stage's output. Raises on any instruction it does not model."""
    build_args: dict[str, str] = {}
    image = Image(name=name, layers=[distroless_stand_in()], env=[PATH_ENV])
    files: list[Entry] = []
    for keyword, args in final_stage(dockerfile):
        if keyword == "FROM":
            if args.split()[0] != "gcr.io/distroless/static-debian12:nonroot":
                raise ValueError(f"the final stage's base changed to {args}: update distroless_stand_in")
        elif keyword == "ARG":
            key, _, default = args.partition("=")
            build_args[key] = default
        elif keyword == "LABEL":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                for arg, default in build_args.items():
                    value = value.replace("${" + arg + "}", {"VERSION": "e2e", "REVISION": "e2e"}.get(arg, default))
                image.labels[key] = value
        elif keyword == "COPY":
            parts = args.split()
            from_build = parts[0].startswith("--from=")
            if from_build:
                parts = parts[1:]
            if len(parts) != 2 or parts[0].startswith("--"):
                raise ValueError(f"COPY {args}: only `COPY [--from=build] SOURCE DEST` is modelled")
            source, dest = parts
            if from_build:
                if Path(source).name != binary.name:
                    raise ValueError(f"COPY --from=build {source}: only the webhook binary is modelled")
                data, mode = binary.read_bytes(), 0o755
            else:
                data, mode = (repo / source).read_bytes(), 0o644
            for parent in Path(dest).parents:
                if str(parent) != "/" and str(parent) not in {e.path for e in files}:
                    files.append(Entry(str(parent), None))
            files.append(Entry(dest, data, mode))
        elif keyword == "USER":
            image.user = args.strip()
        elif keyword == "EXPOSE":
            image.exposed_ports = [p if "/" in p else f"{p}/tcp" for p in args.split()]
        elif keyword == "ENTRYPOINT":
            image.entrypoint = _exec_form(args)
        elif keyword == "CMD":
            image.cmd = _exec_form(args)
        else:
            raise ValueError(f"the Dockerfile's final stage has `{keyword} {args}`, which the cluster image does not model")
    files.sort(key=lambda e: e.path)
    image.layers.append(files)
    return image


def _layer(entries: list[Entry]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path.lstrip("/"))
            info.uid, info.gid, info.mode, info.mtime = entry.uid, entry.gid, entry.mode, 0
            if entry.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return raw.getvalue()


def write_oci_archive(image: Image, out: Path) -> Path:
    """An OCI image layout tarball naming `image.name`, as `ctr images import` reads it."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    layer_descs, diff_ids = [], []
    for entries in image.layers:
        raw = _layer(entries)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        compressed = gzip.compress(raw, compresslevel=1, mtime=0)
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": blob(compressed), "size": len(compressed)})
    config = {"architecture": "amd64", "os": "linux",
              "config": {k: v for k, v in {"User": image.user, "Env": image.env, "Entrypoint": image.entrypoint,
                                           "Cmd": image.cmd, "Labels": image.labels, "WorkingDir": image.workdir,
                                           "ExposedPorts": {p: {} for p in image.exposed_ports}}.items() if v},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": blob(config_bytes), "size": len(config_bytes)},
                "layers": layer_descs}
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": blob(manifest_bytes), "size": len(manifest_bytes),
                            "annotations": {"io.containerd.image.name": image.name,
                                            "org.opencontainers.image.ref.name": image.name.rsplit(":", 1)[-1]}}]}
    with tarfile.open(out, "w") as tar:
        def add(name: str, data: bytes):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
    return out


def single_binary_image(name: str, binary: Path, path: str, *, entrypoint: list[str], user: str = "",
                        extra: list[Entry] | None = None) -> Image:
    """A scratch image holding one static program (pause, Velero, its plugin)."""
    entries = [Entry("/tmp", None, 0o1777)] + (extra or [])
    parents = sorted({str(p) for p in Path(path).parents if str(p) != "/"})
    entries += [Entry(p, None) for p in parents] + [Entry(path, binary.read_bytes(), 0o755)]
    return Image(name=name, layers=[entries], entrypoint=entrypoint, user=user)
