"""The npe2 manifest is valid, its widgets exist, and opening them stays light (no torch)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

WIDGETS = {"Virtual staining", "Coarse masks", "Training"}


def test_manifest_validates_and_points_at_real_code():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-staindiffuser")
    pm.validate_imports()  # every python_name resolves
    names = {w.display_name for w in pm.contributions.widgets}
    assert names == WIDGETS
    commands = {c.id: c.python_name for c in pm.contributions.commands}
    for widget in pm.contributions.widgets:
        module, _, attr = commands[widget.command].partition(":")
        assert isinstance(getattr(importlib.import_module(module), attr), type)
    assert {s.key for s in pm.contributions.sample_data} == {"synthetic-pair", "cmu-1-small-region"}


def test_opening_the_docks_does_not_import_torch(tmp_path):
    """torch is imported when a job starts, not when napari opens the plugin's docks."""
    code = textwrap.dedent(
        """
        import sys
        import napari
        viewer = napari.Viewer(show=False)
        for name in ("Virtual staining", "Coarse masks", "Training"):
            viewer.window.add_plugin_dock_widget("napari-staindiffuser", name)
        print("torch" in sys.modules)
        viewer.close()
        """
    )
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    import os

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
