"""Explicit forward-mode (JVP) rules: each `forward_jvp(x, tx) -> (y, ty)` returns the primal `y`
with its autograd graph and the tangent `ty` without one (see DESIGN.md, "The JVP is explicit")."""
