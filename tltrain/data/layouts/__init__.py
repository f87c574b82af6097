"""The public fundus datasets as users download them: one module per layout, each `read(cfg, follow_links_outside)
-> SourceData` built on the shared readers of tltrain.data.sources (bounded CSVs, image indexes, key assignment,
links leading outside the root). A layout module owns its folder tree, its official splits (Record.split), its
ungradable images (SourceData.ungradable: an outcome, not a problem) and its label sets.

LAYOUTS maps source.kind to the module; tltrain.data.sources.read_source dispatches through it.
"""
from __future__ import annotations

import importlib

LAYOUTS = {
    "eyepacs": "tltrain.data.layouts.eyepacs",
    "aptos2019": "tltrain.data.layouts.aptos2019",
    "messidor2": "tltrain.data.layouts.messidor2",
    "idrid": "tltrain.data.layouts.idrid",
    "ddr": "tltrain.data.layouts.ddr",
}


def layout_reader(kind: str):
    """The read function of a built-in layout (imported on first use: only the one a prepare needs)."""
    return importlib.import_module(LAYOUTS[kind]).read
