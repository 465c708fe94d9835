"""What every cpift figure shares: one colour per task (or group) and the fixed 0–1 colour scale.

Figures of the app and of the exported report use these, so a task keeps its colour from page to
page and overlap heatmaps are comparable across layers, runs and p.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.express as px

#: Categorical colours, in order (plotly's "Plotly" then "D3" palettes: 20 distinct colours).
PALETTE: tuple[str, ...] = (*px.colors.qualitative.Plotly, *px.colors.qualitative.D3)

#: The colour scale of every Jaccard heatmap, always drawn on [0, 1].
UNIT_COLORSCALE = "Viridis"

#: Colour of contested elements (in several cores) and of neutral marks.
NEUTRAL = "#7f7f7f"


def colors(names: Sequence[str]) -> dict[str, str]:
    """A colour per name, by position (wrapping after :data:`PALETTE`)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
