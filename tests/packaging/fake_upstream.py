"""A stand-in for an installed upstream distribution, built in a tmp dir."""

import base64
import hashlib
from pathlib import Path

from build_tools import upstream


def record_hash(data):
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class FakeDistribution:
    """Just what `upstream.Upstream` reads of an `importlib` distribution."""

    def __init__(self, root, files, version=upstream.UPSTREAM_VERSION):
        self.root = Path(root)
        self.version = version
        rows = []
        for path, text in files.items():
            data = text.encode()
            (self.root / path).parent.mkdir(parents=True, exist_ok=True)
            (self.root / path).write_bytes(data)
            rows.append(f"{path},{record_hash(data)},{len(data)}")
        rows.append("keras-3.15.1.dist-info/RECORD,,")
        self.record = "\n".join(rows) + "\n"

    def read_text(self, name):
        return self.record if name == "RECORD" else None

    def locate_file(self, path):
        return self.root / path


def make_upstream(tmp_path, files, **kwargs):
    distribution = FakeDistribution(tmp_path / "site", files, **kwargs)
    return upstream.Upstream(distribution)
