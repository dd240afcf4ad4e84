"""Hatchling build hook: the wheel holds the assembled fork.

For a wheel, the fork (upstream Keras + patches + our files) is assembled
into a temporary folder and that `keras/` tree is what the wheel contains.
For an editable install it is assembled into `build/editable/`, with our
files linked rather than copied, and that folder is put on `sys.path`
(`dev-mode-dirs` in pyproject.toml): edits to our files are live; a change
to a patch or a new file needs the editable install run again.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version, build_data):
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        sys.path.insert(0, str(root))
        try:
            from build_tools import assemble
        finally:
            sys.path.remove(str(root))
        if version == "editable":
            out_dir = root / "build" / "editable"
            out_dir.mkdir(parents=True, exist_ok=True)
            assemble.assemble(out_dir, root, mode="editable")
            return
        self._temporary = tempfile.mkdtemp(prefix="keras-fork-")
        try:
            assemble.assemble(self._temporary, root, mode="wheel")
        except BaseException:
            shutil.rmtree(self._temporary, ignore_errors=True)
            raise
        build_data["force_include"][str(Path(self._temporary) / "keras")] = (
            "keras"
        )

    def finalize(self, version, build_data, artifact_path):
        temporary = getattr(self, "_temporary", None)
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
