"""Taichi kernels of the soft rasterizer: tile binning, forward and hand-written backward.

The formulas are those of docs/design.md ("The soft rasterizer primitive"). Forward and backward evaluate
each (pixel, face) pair with the same ti.funcs, so the backward sees exactly the pairs the forward used.
Gradients are derived by hand rather than by Taichi's autodiff, which is wrong through loops on Vulkan.

Array layouts (Taichi ndarrays over torch tensors; NC = NA + NT channels):
    face_verts   (B, F, 3, 3)   per corner (u, v, z): pixel coordinates and camera depth
    face_attrs   (B, F, 3, NA)  per-corner attributes
    texture      (Bt, Ht, Wt, NT) with face_uvs (Bu, F, 3, 2) and face_shading (B, F, 3, NT)
    params       (9,)  see the slot names below; in the data's float type (f32 runs need no f64 support)
    tile_offsets (B * T + 1,) int32 or int64: tile s of view b lists
                 tile_faces[offsets[b*T+s] : offsets[b*T+s+1]], in ascending face order
    alpha (B, H, W), image (B, H, W, NC), pix_to_face (B, H, W) int32,
    stats (B, H, W, 4) = [m, S, z, T]: the softmax shift and denominator (background included), for backward,
                   the depth of the nearest covering face, and the transmittance T = prod_j (1 - D_j) (alpha is
                   1 - T, but 1 - alpha loses T below ~3e-8 in float32 and the backward needs T itself)

Deterministic backward (see `rasterize_backward`):
    face_rects   (B, F, 3) int32 [tx0, ty0, tiles across] of the rectangle of tiles face f is binned into, and
    face_start   (B * F + 1,) int32: face f of view b owns rows face_start[b*F+f] : face_start[b*F+f+1] of
    entry_grads  (N, NE), one per tile of its rectangle in row-major (= ascending tile) order: that tile's sum
                 of the face's corner gradients (9: g_p0, g_p1, g_p2 (2,) each, g_z (3,)), then 3 * NA
                 attribute and (if shaded) 3 * NT shading gradients, corner-major. N is the number of bin
                 entries: every (tile, face) entry has its row. `reduce_entry_grads` sums a face's rows in order.
    tex_fixed    (Bt, Ht, Wt, NT) int64: texture gradient in fixed point, value * params[FIXED]

Numerics hold under Taichi's fast math (no infinities or NaNs assumed anywhere): every exp has a
non-positive, clamped argument, so nothing relies on exp overflowing to infinity.
"""


import warnings

import taichi as ti

nd = ti.types.ndarray()
# `vals.append` below runs at compile time on a Python list of Taichi expressions, which is intended.
warnings.filterwarnings("ignore", message='.*Calling non-taichi function "vals.append"')

# Slots of `params`. FIXED: the fixed-point scale of texture gradients; SKIP_BELOW: silhouette pixels whose
# |g_alpha| * T is at most this are skipped by the backward (both set per backward call by soft.py).
SIGMA, CUTOFF, GAMMA, EPS, NEAR, FAR, RADIUS, FIXED, SKIP_BELOW = range(9)
# A face is degenerate, and skipped, when |signed area * 2| is below MIN_AREA2 pixels², or below SLIVER times
# its longest edge squared: then its smallest height is under 1e-4 of its longest edge, and its barycentrics
# (s_k / height_k) and their gradients (~ 1 / height) blow up, while float32 edge distances carry an error of
# ~6e-8 x the pixel coordinates (6e-5 px at 1024²) that the barycentrics divide by the height. The test is
# relative, so it holds at any image size and scale; what it drops is a line under 1e-4 of its length wide.
MIN_AREA2 = 1e-8
SLIVER = 1e-4
# exp(-EXP_LIMIT) is a normal float32 (1.8e-35): exp arguments are clamped to [-EXP_LIMIT, 0], so no exp
# underflows to a denormal (flushed or not, depending on the backend) nor overflows.
EXP_LIMIT = 80.0
CORNER_SLOTS = 9  # leading entry_grads columns: g_p0, g_p1, g_p2 (x, y each), g_z (3)


@ti.func
def _cross(u, v):
    return u[0] * v[1] - u[1] * v[0]


@ti.func
def _corners(face_verts: ti.template(), b, f, fp: ti.template()):
    p0 = ti.Vector([face_verts[b, f, 0, 0], face_verts[b, f, 0, 1]], dt=fp)
    p1 = ti.Vector([face_verts[b, f, 1, 0], face_verts[b, f, 1, 1]], dt=fp)
    p2 = ti.Vector([face_verts[b, f, 2, 0], face_verts[b, f, 2, 1]], dt=fp)
    z = ti.Vector([face_verts[b, f, 0, 2], face_verts[b, f, 1, 2], face_verts[b, f, 2, 2]], dt=fp)
    return p0, p1, p2, z


@ti.func
def _face_ok(p0, p1, p2, z, near, cull: ti.template()):
    """A face takes part if it is in front of the near plane, not degenerate (nor a sliver, see SLIVER), and
    not culled."""
    e1, e2 = p1 - p0, p2 - p0
    area2 = _cross(e1, e2)
    # The sliver test on edges scaled to ~1, so squaring huge projected coordinates cannot overflow.
    scale = ti.max(ti.abs(e1).max(), ti.abs(e2).max(), 1e-30)
    u1, u2 = e1 / scale, e2 / scale
    longest2 = ti.max(u1.norm_sqr(), u2.norm_sqr(), (u2 - u1).norm_sqr())
    ok = (z.min() >= near and ti.abs(area2) >= MIN_AREA2
          and ti.abs(_cross(u1, u2)) >= SLIVER * longest2)
    if ti.static(cull):
        ok = ok and area2 < 0  # front faces have negative signed area with y pointing down
    return ok


@ti.func
def _exp_neg(a):
    """exp(a) for a <= 0, with a clamped to [-EXP_LIMIT, 0]: a relative error of at most exp(-80) on what
    it is added to, never an infinity, a NaN or a denormal (also for a = -inf from a huge / tiny ratio)."""
    return ti.exp(ti.math.clamp(a, -EXP_LIMIT, 0.0))


@ti.func
def _sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)), from exp(-|x|) only: no overflow for any x, and 1 - D is not rounded away
    when D is close to 1 (the transmittance is a product of such factors)."""
    e = _exp_neg(-ti.abs(x))
    inv = 1.0 / (1.0 + e)
    return ti.select(x >= 0, inv, e * inv), ti.select(x >= 0, e * inv, inv)


@ti.func
def _pixel_range(lo, hi, radius, n):
    """Pixel indices whose centres (i + 0.5) lie in [lo - radius, hi + radius], clamped to [0, n - 1]."""
    # Clamp before the cast: projected corners can be huge (vertices near the camera plane).
    i0 = ti.max(ti.cast(ti.ceil(ti.math.clamp(lo - radius - 0.5, -1e6, 1e6)), ti.i32), 0)
    i1 = ti.min(ti.cast(ti.floor(ti.math.clamp(hi + radius - 0.5, -1e6, 1e6)), ti.i32), n - 1)
    return i0, i1


@ti.func
def _seg_closest(p, a, b, inv_len2):
    """Parameter t in [0, 1] of the point of segment ab closest to p, and its squared distance
    (inv_len2 = 1 / |b - a|^2, precomputed in the face setup)."""
    e = b - a
    t = ti.math.clamp((p - a).dot(e) * inv_len2, 0.0, 1.0)
    r = p - (a + t * e)
    return t, r.dot(r)


@ti.func
def _nearest_edge(S, p, p0, p1, p2, s, fp: ti.template()):
    """Squared distance from p to the nearest edge segment, that edge (0: p0p1, 1: p1p2, 2: p2p0) and the
    closest point's parameter t along it (S: the face's setup row, s: p's edge-line distances).

    Only edges with p on the outer side of their line can hold the nearest boundary point of a point outside
    a convex polygon, and for a point inside it is the nearest line's edge: the others are skipped."""
    corners = [p0, p1, p2]
    inside = s.min() >= 0
    d2, t, edge = ti.cast(0.0, fp), ti.cast(0.0, fp), -1
    for k in ti.static(range(3)):
        if s[k] < 0 or (inside and edge < 0 and s[k] == s.min()):
            tk, dk = _seg_closest(p, corners[k], corners[(k + 1) % 3], S[16 + k])
            if edge < 0 or dk < d2:
                t, d2, edge = tk, dk, k
    return d2, edge, t


# Per-face setup (nvdiffrast-style triangle setup), SETUP floats per face:
#   [0:4]   window: bounding box grown by the cut-off radius (lo.x, lo.y, hi.x, hi.y)
#   [4:13]  three edge lines (n.x, n.y, c) with unit inward normals: s_k(p) = n_k . p + c_k is the signed
#           distance from p to the line of edge k (P_k -> P_k+1), >= 0 on the triangle's side
#   [13:16] |edge k| / |area2|, so the barycentric of the vertex opposite edge k is s_k * that
#   [16:19] 1 / |edge k|^2, for the closest points on the edges without divisions per pixel
SETUP = 19


@ti.func
def _load_face(setup: ti.template(), face_verts: ti.template(), b, f, fp: ti.template()):
    """Face f's setup row S (SETUP,) and corners (p0, p1, p2, z), read once per tile and then kept in
    registers while the tile's pixels are tested against them."""
    S = ti.Vector([setup[b, f, k] for k in ti.static(range(SETUP))], dt=fp)
    p0, p1, p2, z = _corners(face_verts, b, f, fp)
    return S, p0, p1, p2, z


@ti.func
def _coverage(S, p, radius, fp: ti.template()):
    """Cheap tests of pixel centre p against a face (setup row S): (near, s) where near says p lies within
    the cut-off radius of every edge line (a necessary condition for coverage) and s (3,) are the line
    distances."""
    s = ti.Vector([-radius - 1.0, 0.0, 0.0], dt=fp)
    near = p[0] >= S[0] and p[1] >= S[1] and p[0] <= S[2] and p[1] <= S[3]
    if near:
        s = ti.Vector([S[4 + 3 * k] * p[0] + S[5 + 3 * k] * p[1] + S[6 + 3 * k] for k in ti.static(range(3))])
        near = s.min() >= -radius
    return near, s


@ti.func
def _barycentrics(S, s):
    """Screen barycentrics (w0, w1, w2) from the edge-line distances (w_k is opposite edge k + 1)."""
    return ti.Vector([s[1] * S[14], s[2] * S[15], s[0] * S[13]])


@ti.func
def _select(S, p0, p1, p2, p, radius, cutoff, with_edge: ti.template(), fp: ti.template()):
    """Whether a face reaches pixel centre p (covers it, or is within the cut-off distance), with the
    screen barycentrics w, the inside flag, the squared distance d2 to the boundary, the nearest edge and the
    parameter of the closest point on it (inside the face, only if with_edge). Forward and backward both
    select pairs with this, so they always see the same pairs."""
    w = ti.Vector([0.0, 0.0, 0.0], dt=fp)  # built from a list: see the module docstring
    inside = False
    d2, t, edge = ti.cast(0.0, fp), ti.cast(0.0, fp), -1
    near_face, s = _coverage(S, p, radius, fp)
    if near_face:
        w = _barycentrics(S, s)
        inside = s.min() >= 0
        if ti.static(with_edge) or not inside:
            d2, edge, t = _nearest_edge(S, p, p0, p1, p2, s, fp)
        if inside:
            d2 = s.min() * s.min()  # the same distance: the nearest point lies on the nearest line
    return near_face and (inside or d2 <= cutoff), w, inside, d2, edge, t


@ti.func
def _tile_pixels(S, x0, y0, x1, y1):
    """The pixels of tile [x0, x1] x [y0, y1] that face window S[0:4] may reach (one pixel of slack each
    side; _coverage makes the exact test): (xa, xb, ya, yb), empty when xa > xb or ya > yb."""
    xa, xb = _pixel_range(S[0], S[2], 1.0, x1 + 1)
    ya, yb = _pixel_range(S[1], S[3], 1.0, y1 + 1)
    return ti.max(xa, x0), xb, ti.max(ya, y0), yb


@ti.func
def _perspective(w, z):
    """Clipped perspective-correct barycentrics: returns (wp, zp, wc, Q) with Q = sum(wc / z) = 1 / zp."""
    c = ti.math.clamp(w, 0.0, 1.0)
    wc = c / c.sum()  # sum(c) >= 1 whenever sum(w) == 1: never a division by zero
    q = wc / z
    Q = q.sum()
    return q / Q, 1.0 / Q, wc, Q


@ti.func
def _interp(arr: ti.template(), b, f, c, wp):
    """Barycentric interpolation of a per-corner array (B, F, 3, C) at channel c."""
    return wp[0] * arr[b, f, 0, c] + wp[1] * arr[b, f, 1, c] + wp[2] * arr[b, f, 2, c]


@ti.func
def _texel(u, v, Ht, Wt, fp: ti.template()):
    """Bilinear footprint of uv: (x0, y0, x1, y1, fx, fy, dx_du, dy_dv), clamped to the edge texels."""
    xr = u * Wt - 0.5
    yr = (1.0 - v) * Ht - 0.5
    x = ti.math.clamp(xr, 0.0, ti.cast(Wt - 1, fp))
    y = ti.math.clamp(yr, 0.0, ti.cast(Ht - 1, fp))
    x0 = ti.min(ti.cast(ti.floor(x), ti.i32), Wt - 1)
    y0 = ti.min(ti.cast(ti.floor(y), ti.i32), Ht - 1)
    dx_du = ti.cast(Wt, fp) if (xr == x) else ti.cast(0.0, fp)  # zero slope where clamped
    dy_dv = -ti.cast(Ht, fp) if (yr == y) else ti.cast(0.0, fp)
    return x0, y0, ti.min(x0 + 1, Wt - 1), ti.min(y0 + 1, Ht - 1), x - x0, y - y0, dx_du, dy_dv


@ti.func
def _face_value(face_attrs: ti.template(), texture: ti.template(), face_uvs: ti.template(),
                face_shading: ti.template(), b, f, wp, NA: ti.template(), NT: ti.template(),
                shaded: ti.template(), fp: ti.template()):
    """The face's value at the pixel: interpolated attributes, then shading * bilinear texture."""
    vals = [_interp(face_attrs, b, f, c, wp)
            for c in ti.static(range(NA))]
    if ti.static(NT > 0):
        bu = ti.min(b, face_uvs.shape[0] - 1)
        bt = ti.min(b, texture.shape[0] - 1)
        u = _interp(face_uvs, bu, f, 0, wp)
        v = _interp(face_uvs, bu, f, 1, wp)
        x0, y0, x1, y1, fx, fy, _dx, _dy = _texel(u, v, texture.shape[1], texture.shape[2], fp)
        for c in ti.static(range(NT)):
            tex = ((1 - fy) * ((1 - fx) * texture[bt, y0, x0, c] + fx * texture[bt, y0, x1, c])
                   + fy * ((1 - fx) * texture[bt, y1, x0, c] + fx * texture[bt, y1, x1, c]))
            if ti.static(shaded):
                tex *= _interp(face_shading, b, f, c, wp)
            vals.append(tex)
    if ti.static(NA + NT == 0):
        vals.append(0.0)  # kernels keep a 1-channel dummy image when there are no channels
    return ti.Vector(vals, dt=fp)


@ti.func
def _add_face_grad(g_arr: ti.template(), entry_grads: ti.template(), i, b, f, k, c, slot, v,
                   det: ti.template()):
    """Add v to a per-corner gradient g_arr[b, f, k, c]: atomically, or (det) to entry_grads row i at column
    `slot` (the face's row for this tile: only this tile's thread writes it, a plain add in a fixed order)."""
    if ti.static(det):
        entry_grads[i, slot] = entry_grads[i, slot] + v
    else:
        ti.atomic_add(g_arr[b, f, k, c], v)


@ti.func
def _add_texel_grad(g_texture: ti.template(), tex_fixed: ti.template(), fixed_scale, bt, y, x, c, v,
                    det: ti.template()):
    """Add v to texel (bt, y, x, c)'s gradient: a float atomic, or (det) an int64 atomic in fixed point,
    whose sum does not depend on the order (soft.py picks fixed_scale so no sum can overflow)."""
    if ti.static(det):
        ti.atomic_add(tex_fixed[bt, y, x, c], ti.cast(ti.round(v * fixed_scale), ti.i64))
    else:
        ti.atomic_add(g_texture[bt, y, x, c], v)


@ti.func
def _face_value_backward(face_attrs: ti.template(), texture: ti.template(), face_uvs: ti.template(),
                         face_shading: ti.template(), g_attrs: ti.template(), g_texture: ti.template(),
                         g_shading: ti.template(), entry_grads: ti.template(), tex_fixed: ti.template(),
                         fixed_scale, i, b, f, wp, g_val, NA: ti.template(), NT: ti.template(),
                         shaded: ti.template(), det: ti.template(), fp: ti.template()):
    """Scatter dL/d(face value) to attributes, texture and shading (atomically, or with det to bin entry i's
    row and the fixed-point texture); return dL/d(wp) (3,)."""
    g_wp = ti.Vector.zero(fp, 3)
    for c in ti.static(range(NA)):
        for k in ti.static(range(3)):
            g_wp[k] += g_val[c] * face_attrs[b, f, k, c]
            _add_face_grad(g_attrs, entry_grads, i, b, f, k, c, CORNER_SLOTS + k * NA + c, g_val[c] * wp[k], det)
    if ti.static(NT > 0):
        bu = ti.min(b, face_uvs.shape[0] - 1)
        bt = ti.min(b, texture.shape[0] - 1)
        u = _interp(face_uvs, bu, f, 0, wp)
        v = _interp(face_uvs, bu, f, 1, wp)
        x0, y0, x1, y1, fx, fy, dx_du, dy_dv = _texel(u, v, texture.shape[1], texture.shape[2], fp)
        for c in ti.static(range(NT)):
            t00, t10 = texture[bt, y0, x0, c], texture[bt, y0, x1, c]
            t01, t11 = texture[bt, y1, x0, c], texture[bt, y1, x1, c]
            tex = (1 - fy) * ((1 - fx) * t00 + fx * t10) + fy * ((1 - fx) * t01 + fx * t11)
            sh = ti.cast(1.0, fp)
            if ti.static(shaded):
                sh = _interp(face_shading, b, f, c, wp)
                for k in ti.static(range(3)):
                    g_wp[k] += g_val[NA + c] * tex * face_shading[b, f, k, c]
                    _add_face_grad(g_shading, entry_grads, i, b, f, k, c, CORNER_SLOTS + 3 * NA + k * NT + c,
                                   g_val[NA + c] * tex * wp[k], det)
            g_tex = g_val[NA + c] * sh
            _add_texel_grad(g_texture, tex_fixed, fixed_scale, bt, y0, x0, c, g_tex * (1 - fx) * (1 - fy), det)
            _add_texel_grad(g_texture, tex_fixed, fixed_scale, bt, y0, x1, c, g_tex * fx * (1 - fy), det)
            _add_texel_grad(g_texture, tex_fixed, fixed_scale, bt, y1, x0, c, g_tex * (1 - fx) * fy, det)
            _add_texel_grad(g_texture, tex_fixed, fixed_scale, bt, y1, x1, c, g_tex * fx * fy, det)
            # The texture also moves under the pixel as the barycentrics change (through uv).
            dtex_du = ((1 - fy) * (t10 - t00) + fy * (t11 - t01)) * dx_du
            dtex_dv = ((1 - fx) * (t01 - t00) + fx * (t11 - t10)) * dy_dv
            for k in ti.static(range(3)):
                g_wp[k] += g_tex * (dtex_du * face_uvs[bu, f, k, 0] + dtex_dv * face_uvs[bu, f, k, 1])
    return g_wp


@ti.func
def _barycentric_backward(p, p0, p1, p2, z, w, wp, zp, wc, Q, g_wp, g_zp):
    """Chain dL/d(wp) and dL/d(zp) back through perspective correction, clipping and the screen
    barycentrics to the corners: returns (g_p0, g_p1, g_p2) (2,) each and g_z (3,)."""
    g_q = (g_wp - g_wp.dot(wp)) / Q - g_zp * zp * zp  # wp = q / Q, zp = 1 / Q, q = wc / z
    g_wc = g_q / z
    g_z = -g_q * wc / (z * z)
    c = ti.math.clamp(w, 0.0, 1.0)
    g_c = (g_wc - g_wc.dot(wc)) / c.sum()
    g_w = ti.Vector([ti.select(w[k] > 0 and w[k] < 1, g_c[k], 0.0) for k in ti.static(range(3))])
    area2 = _cross(p1 - p0, p2 - p0)
    g_e = (g_w - g_w.dot(w)) / area2  # w_k = E_k / area2 with E the sub-triangle areas (x2)
    a0, a1, a2 = p0 - p, p1 - p, p2 - p
    # d cross(u, v) / du = (v.y, -v.x), / dv = (-u.y, u.x); E0 = a1 x a2, E1 = a2 x a0, E2 = a0 x a1.
    g_p0 = g_e[1] * ti.Vector([-a2[1], a2[0]]) + g_e[2] * ti.Vector([a1[1], -a1[0]])
    g_p1 = g_e[0] * ti.Vector([a2[1], -a2[0]]) + g_e[2] * ti.Vector([-a0[1], a0[0]])
    g_p2 = g_e[0] * ti.Vector([-a1[1], a1[0]]) + g_e[1] * ti.Vector([a0[1], -a0[0]])
    return g_p0, g_p1, g_p2, g_z


# Binning (which faces may touch which screen tiles) lives in binning.py.


@ti.func
def _face_setup_row(face_verts: ti.template(), params: ti.template(), setup: ti.template(), b, f,
                    fp: ti.template()):
    """Face f of view b's setup row (see SETUP)."""
    p0, p1, p2, _z = _corners(face_verts, b, f, fp)
    lo, hi = ti.min(p0, p1, p2) - params[RADIUS], ti.max(p0, p1, p2) + params[RADIUS]
    area2 = _cross(p1 - p0, p2 - p0)
    inward = 1.0 if area2 > 0 else -1.0  # interior is left of each edge when area2 > 0 (y down)
    abs_area2 = ti.max(ti.abs(area2), 1e-30)  # degenerate faces are never binned; keep them finite
    setup[b, f, 0], setup[b, f, 1], setup[b, f, 2], setup[b, f, 3] = lo[0], lo[1], hi[0], hi[1]
    for k in ti.static(range(3)):
        a = p0 if k == 0 else (p1 if k == 1 else p2)
        e = (p1 if k == 0 else (p2 if k == 1 else p0)) - a
        length = ti.max(e.norm(), 1e-30)
        n = inward * ti.Vector([-e[1], e[0]]) / length
        setup[b, f, 4 + 3 * k] = n[0]
        setup[b, f, 5 + 3 * k] = n[1]
        setup[b, f, 6 + 3 * k] = -n.dot(a)
        setup[b, f, 13 + k] = ti.min(length / abs_area2, 1e30)  # finite even for faces never binned
        setup[b, f, 16 + k] = 1.0 / ti.max(length * length, 1e-30)


@ti.kernel
def face_setup(face_verts: nd, params: nd, setup: nd, chunk: ti.i32, fp: ti.template()):
    """setup (B, F, SETUP): each face's row (see SETUP). One thread per (view, chunk of `chunk` consecutive
    faces): a thread per face spent more time being scheduled than computing (measured on B1, 324k faces)."""
    F = face_verts.shape[1]
    for b, k in ti.ndrange(face_verts.shape[0], (F + chunk - 1) // chunk):
        for f in range(k * chunk, ti.min((k + 1) * chunk, F)):
            _face_setup_row(face_verts, params, setup, b, f, fp)


@ti.func
def _add_corner_grads(g_verts: ti.template(), b, f, g_p0, g_p1, g_p2, g_z, with_z: ti.template()):
    for c in ti.static(range(2)):
        ti.atomic_add(g_verts[b, f, 0, c], g_p0[c])
        ti.atomic_add(g_verts[b, f, 1, c], g_p1[c])
        ti.atomic_add(g_verts[b, f, 2, c], g_p2[c])
    if ti.static(with_z):
        for k in ti.static(range(3)):
            ti.atomic_add(g_verts[b, f, k, 2], g_z[k])


# ----------------------------------------------------------------------------------------------------
# Forward and backward, one thread per screen tile: each face of the tile's list is read once, then tested
# against the tile's pixels inside its window. Per-pixel state lives in the output arrays (in cache), and
# every pixel still sees its faces in ascending order, so results do not depend on the tile size.
# `block` is the loop's block_dim: 1 on the CPU, where a task is one tile (tiles are few and their costs
# uneven), the GPU thread-block size elsewhere.


@ti.func
def _tile(alpha: ti.template(), b, ty, tx, tile):
    """Pixel bounds (x0, y0, x1, y1) of tile (ty, tx), inclusive, clipped to the image."""
    x0, y0 = tx * tile, ty * tile
    return x0, y0, ti.min(x0 + tile, alpha.shape[2]) - 1, ti.min(y0 + tile, alpha.shape[1]) - 1


@ti.func
def _blend(face_attrs: ti.template(), texture: ti.template(), face_uvs: ti.template(),
           face_shading: ti.template(), params: ti.template(), alpha: ti.template(), image: ti.template(),
           stats: ti.template(), b, y, x, f, wp, zp, inside, d2, NA: ti.template(), NT: ti.template(),
           shaded: ti.template(), fp: ti.template()):
    """Soft mode: fold face f's coverage (and value) into pixel (b, y, x)'s running state."""
    sigma, gamma, near, far = params[SIGMA], params[GAMMA], params[NEAR], params[FAR]
    xs = (d2 if inside else -d2) / sigma
    D, one_minus_d = _sigmoid_pair(xs)
    alpha[b, y, x] *= one_minus_d
    if ti.static(NA + NT > 0):
        zn = (far - zp) / (far - near)
        m = stats[b, y, x, 0]
        scale = ti.cast(1.0, fp)
        if zn > m:  # a new maximum: rescale what was summed so far (a streaming softmax, shifted by the max)
            scale = _exp_neg((m - zn) / gamma)
            m = zn
            stats[b, y, x, 0] = m
        e = _exp_neg((zn - m) / gamma) * D
        stats[b, y, x, 1] = stats[b, y, x, 1] * scale + e
        val = _face_value(face_attrs, texture, face_uvs, face_shading, b, f, wp, NA, NT, shaded, fp)
        for c in ti.static(range(NA + NT)):
            image[b, y, x, c] = image[b, y, x, c] * scale + e * val[c]


@ti.kernel
def rasterize_forward(face_verts: nd, face_attrs: nd, texture: nd, face_uvs: nd, face_shading: nd,
                      setup: nd, params: nd, background: nd, offsets: nd, tile_faces: nd,
                      alpha: nd, image: nd, pix_to_face: nd, stats: nd,
                      tile: ti.i32, tiles_x: ti.i32, n_tiles: ti.i32,
                      NA: ti.template(), NT: ti.template(), shaded: ti.template(), hard: ti.template(),
                      cull: ti.template(), fp: ti.template(), block: ti.template()):
    ti.loop_config(block_dim=block)
    for b, ty, tx in ti.ndrange(alpha.shape[0], n_tiles // tiles_x, tiles_x):
        x0, y0, x1, y1 = _tile(alpha, b, ty, tx, tile)
        cutoff, near, far, radius = params[CUTOFF], params[NEAR], params[FAR], params[RADIUS]
        # While accumulating: alpha holds the transmittance prod_j (1 - D_j) (underflow to 0 just means
        # alpha = 1), stats [m, S, z] the softmax shift max(eps, max_j zn_j), the denominator (background
        # weight exp((eps - m) / gamma) included, rescaled as m grows) and the nearest covering depth.
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                alpha[b, y, x] = 1.0
                stats[b, y, x, 0], stats[b, y, x, 1], stats[b, y, x, 2] = params[EPS], 1.0, far
                pix_to_face[b, y, x] = -1
                for c in ti.static(range(max(NA + NT, 1))):
                    image[b, y, x, c] = background[c]
        for i in range(offsets[b * n_tiles + ty * tiles_x + tx], offsets[b * n_tiles + ty * tiles_x + tx + 1]):
            f = tile_faces[i]
            S, p0, p1, p2, z = _load_face(setup, face_verts, b, f, fp)
            xa, xb, ya, yb = _tile_pixels(S, x0, y0, x1, y1)
            for y in range(ya, yb + 1):  # nested ranges: ndrange divides per step
                for x in range(xa, xb + 1):
                    p = ti.Vector([x + 0.5, y + 0.5], dt=fp)
                    ok, w, inside, d2, _edge, _t = _select(S, p0, p1, p2, p, radius, cutoff, False, fp)
                    if not ok:
                        continue
                    # zp is a weighted harmonic mean of the corner depths, so it can only leave [near, far] if
                    # the face crosses `far`; silhouettes need it only to pick the nearest covering face.
                    zp = far
                    wp = ti.Vector([1.0, 0.0, 0.0], dt=fp)
                    if ti.static(NA + NT > 0 or hard) or inside or z.max() > far:
                        wp, zp, _wc, _q = _perspective(w, z)
                        if zp < near or zp > far:
                            continue
                    if inside and zp < stats[b, y, x, 2]:
                        stats[b, y, x, 2] = zp
                        pix_to_face[b, y, x] = f
                    if ti.static(not hard):
                        _blend(face_attrs, texture, face_uvs, face_shading, params, alpha, image, stats,
                               b, y, x, f, wp, zp, inside, d2, NA, NT, shaded, fp)
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if ti.static(hard):
                    f = pix_to_face[b, y, x]
                    alpha[b, y, x] = 1.0 if f >= 0 else 0.0
                    stats[b, y, x, 3] = 1.0 - alpha[b, y, x]
                    if f >= 0:  # the nearest covering face's value
                        S, _p0, _p1, _p2, z = _load_face(setup, face_verts, b, f, fp)
                        _near, s_lines = _coverage(S, ti.Vector([x + 0.5, y + 0.5], dt=fp), radius, fp)
                        wp, _zp, _wc, _q = _perspective(_barycentrics(S, s_lines), z)
                        val = _face_value(face_attrs, texture, face_uvs, face_shading, b, f, wp, NA, NT, shaded, fp)
                        for c in ti.static(range(max(NA + NT, 1))):
                            image[b, y, x, c] = val[c]
                else:
                    stats[b, y, x, 3] = alpha[b, y, x]
                    alpha[b, y, x] = 1.0 - alpha[b, y, x]
                    for c in ti.static(range(max(NA + NT, 1))):
                        image[b, y, x, c] = image[b, y, x, c] / stats[b, y, x, 1]


@ti.func
def _sign(inside):
    return 1.0 if inside else -1.0


@ti.func
def _pair_backward(face_verts: ti.template(), face_attrs: ti.template(), texture: ti.template(),
                   face_uvs: ti.template(), face_shading: ti.template(), params: ti.template(),
                   alpha: ti.template(), image: ti.template(), stats: ti.template(), g_alpha: ti.template(),
                   g_image: ti.template(), g_attrs: ti.template(), g_texture: ti.template(),
                   g_shading: ti.template(), entry_grads: ti.template(), tex_fixed: ti.template(), i,
                   b, y, x, f, S, p0, p1, p2, z,
                   NA: ti.template(), NT: ti.template(), shaded: ti.template(), hard: ti.template(),
                   det: ti.template(), fp: ti.template()):
    """Gradient of pixel (b, y, x) through face f (entry_grads row i with det), if the pair was selected:
    scatters to the face's attributes, texture and shading, and returns the corner gradients (g_p0, g_p1, g_p2)
    (2,) and g_z (3,)."""
    sigma, cutoff, gamma = params[SIGMA], params[CUTOFF], params[GAMMA]
    near, far, radius = params[NEAR], params[FAR], params[RADIUS]
    g_p0, g_p1, g_p2 = ti.Vector([0.0, 0.0], dt=fp), ti.Vector([0.0, 0.0], dt=fp), ti.Vector([0.0, 0.0], dt=fp)
    g_z = ti.Vector([0.0, 0.0, 0.0], dt=fp)
    p = ti.Vector([x + 0.5, y + 0.5], dt=fp)
    ok, w, inside, d2, edge, t = _select(S, p0, p1, p2, p, radius, cutoff, True, fp)
    wp, zp, wc, Q = w, far, w, ti.cast(1.0, fp)
    if ok:
        if ti.static(NA + NT > 0 or hard) or z.max() > far:  # as in the forward: silhouettes skip this
            wp, zp, wc, Q = _perspective(w, z)
            ok = zp >= near and zp <= far
    if ok:
        g_img = ti.Vector([g_image[b, y, x, c] for c in ti.static(range(max(NA + NT, 1)))], dt=fp)
        g_val = g_img
        g_x = ti.cast(0.0, fp)
        g_zp = ti.cast(0.0, fp)
        if ti.static(not hard):
            xs = (_sign(inside) * d2) / sigma
            D, one_minus_d = _sigmoid_pair(xs)
            g_x = g_alpha[b, y, x] * stats[b, y, x, 3] * D  # d alpha / d x_j = T * D_j

            if ti.static(NA + NT > 0):
                img = ti.Vector([image[b, y, x, c] for c in ti.static(range(NA + NT))], dt=fp)
                m, denom = stats[b, y, x, 0], stats[b, y, x, 1]
                zn = (far - zp) / (far - near)
                ez = _exp_neg((zn - m) / gamma)
                weight = D * ez / denom
                val = _face_value(face_attrs, texture, face_uvs, face_shading, b, f, wp, NA, NT, shaded, fp)
                proj = g_img.dot(val - img)
                g_x += proj * ez / denom * D * one_minus_d
                g_zp = -proj * weight / gamma / (far - near)
                g_val = g_img * weight
        if ti.static(NA + NT > 0):
            g_wp = _face_value_backward(face_attrs, texture, face_uvs, face_shading, g_attrs, g_texture,
                                        g_shading, entry_grads, tex_fixed, params[FIXED], i, b, f, wp, g_val,
                                        NA, NT, shaded, det, fp)
            g_p0, g_p1, g_p2, g_z = _barycentric_backward(p, p0, p1, p2, z, w, wp, zp, wc, Q, g_wp, g_zp)
        if ti.static(not hard):
            # d2 = |p - q|^2 with q = a + t (e - a) the closest point of the nearest edge (a, e); t is
            # optimal there, so only the explicit dependence on the edge's end points remains.
            a, e = p2, p0
            if edge == 0:
                a, e = p0, p1
            elif edge == 1:
                a, e = p1, p2
            r = -2.0 * g_x * _sign(inside) / sigma * (p - (a + t * (e - a)))
            g_a, g_e = r * (1.0 - t), r * t
            if edge == 0:
                g_p0 += g_a
                g_p1 += g_e
            elif edge == 1:
                g_p1 += g_a
                g_p2 += g_e
            else:
                g_p2 += g_a
                g_p0 += g_e
    return g_p0, g_p1, g_p2, g_z


def entry_columns(n_attrs: int, n_tex: int, shaded: bool) -> int:
    """Columns of entry_grads: the corner gradients, then attribute and shading gradients per corner."""
    return CORNER_SLOTS + 3 * n_attrs + (3 * n_tex if shaded else 0)


@ti.func
def _store_corner_grads(g_verts: ti.template(), entry_grads: ti.template(), i, b, f, g_p0, g_p1, g_p2, g_z,
                        with_z: ti.template(), det: ti.template()):
    """A tile's sum of face f's corner gradients: added atomically to g_verts, or (det) stored in entry_grads
    row i (the face's row for the tile), for `reduce_entry_grads` to sum in tile order."""
    if ti.static(det):
        for c in ti.static(range(2)):
            entry_grads[i, c] = g_p0[c]
            entry_grads[i, 2 + c] = g_p1[c]
            entry_grads[i, 4 + c] = g_p2[c]
        for k in ti.static(range(3)):
            entry_grads[i, 6 + k] = g_z[k]
    else:
        _add_corner_grads(g_verts, b, f, g_p0, g_p1, g_p2, g_z, with_z)


@ti.kernel
def rasterize_backward(face_verts: nd, face_attrs: nd, texture: nd, face_uvs: nd, face_shading: nd,
                       setup: nd, params: nd, offsets: nd, tile_faces: nd,
                       alpha: nd, image: nd, pix_to_face: nd, stats: nd, g_alpha: nd, g_image: nd,
                       g_verts: nd, g_attrs: nd, g_texture: nd, g_shading: nd, entry_grads: nd, tex_fixed: nd,
                       face_rects: nd, face_start: nd, tile: ti.i32, tiles_x: ti.i32, n_tiles: ti.i32,
                       NA: ti.template(), NT: ti.template(), shaded: ti.template(), hard: ti.template(),
                       cull: ti.template(), fp: ti.template(), block: ti.template(), det: ti.template()):
    """One thread per tile, as the forward. det=False adds every gradient to g_verts / g_attrs / g_texture /
    g_shading with float atomics, whose order varies from run to run. det=True makes it reproducible: each bin
    entry's sums go to the face's row for that tile (no atomics; `reduce_entry_grads` then sums a face's rows
    in tile order) and texture gradients to tex_fixed in int64 fixed point (order-independent). In soft mode
    both walk the bin entries alike, so every face's per-tile sums are the same whichever mode runs."""
    ti.loop_config(block_dim=block)
    for b, ty, tx in ti.ndrange(alpha.shape[0], n_tiles // tiles_x, tiles_x):
        x0, y0, x1, y1 = _tile(alpha, b, ty, tx, tile)
        if ti.static(hard and not det):
            # Only the visible face's value depends on anything smooth: visit each pixel's face once.
            for y in range(y0, y1 + 1):
                for x in range(x0, x1 + 1):
                    f = pix_to_face[b, y, x]
                    if f >= 0:
                        S, p0, p1, p2, z = _load_face(setup, face_verts, b, f, fp)
                        g_p0, g_p1, g_p2, g_z = _pair_backward(
                            face_verts, face_attrs, texture, face_uvs, face_shading, params, alpha, image, stats,
                            g_alpha, g_image, g_attrs, g_texture, g_shading, entry_grads, tex_fixed, 0,
                            b, y, x, f, S, p0, p1, p2, z, NA, NT, shaded, hard, det, fp)
                        _add_corner_grads(g_verts, b, f, g_p0, g_p1, g_p2, g_z, NA + NT > 0)
        else:
            for i in range(offsets[b * n_tiles + ty * tiles_x + tx], offsets[b * n_tiles + ty * tiles_x + tx + 1]):
                f = tile_faces[i]
                S, p0, p1, p2, z = _load_face(setup, face_verts, b, f, fp)
                xa, xb, ya, yb = _tile_pixels(S, x0, y0, x1, y1)
                row = 0  # det: the face's entry_grads row for this tile
                if ti.static(det):
                    row = (face_start[b * face_verts.shape[1] + f] + (ty - face_rects[b, f, 1]) * face_rects[b, f, 2]
                           + tx - face_rects[b, f, 0])
                    for c in ti.static(range(CORNER_SLOTS, entry_columns(NA, NT, shaded))):
                        entry_grads[row, c] = 0.0
                # The face's corner gradients, summed over this tile's pixels, then added once.
                g_p0, g_p1, g_p2 = (ti.Vector([0.0, 0.0], dt=fp), ti.Vector([0.0, 0.0], dt=fp),
                                    ti.Vector([0.0, 0.0], dt=fp))
                g_z = ti.Vector([0.0, 0.0, 0.0], dt=fp)
                for y in range(ya, yb + 1):  # nested ranges: ndrange divides per step
                    for x in range(xa, xb + 1):
                        if ti.static(hard):
                            if pix_to_face[b, y, x] != f:
                                continue  # hard mode: only the pixel's visible face
                        elif ti.static(NA + NT == 0):
                            # Every pair's gradient here is g_alpha * T * D_j * (...): skip pixels whose g_alpha * T
                            # is zero, or below float rounding of the image's largest (saturated interiors).
                            if ti.abs(g_alpha[b, y, x]) * stats[b, y, x, 3] <= params[SKIP_BELOW]:
                                continue
                        d_p0, d_p1, d_p2, d_z = _pair_backward(
                            face_verts, face_attrs, texture, face_uvs, face_shading, params, alpha, image, stats,
                            g_alpha, g_image, g_attrs, g_texture, g_shading, entry_grads, tex_fixed, row,
                            b, y, x, f, S, p0, p1, p2, z, NA, NT, shaded, hard, det, fp)
                        g_p0 += d_p0
                        g_p1 += d_p1
                        g_p2 += d_p2
                        g_z += d_z
                _store_corner_grads(g_verts, entry_grads, row, b, f, g_p0, g_p1, g_p2, g_z, NA + NT > 0, det)


@ti.func
def _reduce_face_rows(face_start: ti.template(), entry_grads: ti.template(), g_verts: ti.template(),
                      g_attrs: ti.template(), g_shading: ti.template(), b, f, NA: ti.template(), NT: ti.template(),
                      shaded: ti.template(), with_z: ti.template()):
    """Face f of view b's rows, added in order (see `reduce_entry_grads`)."""
    bf = b * g_verts.shape[1] + f
    for r in range(face_start[bf], face_start[bf + 1]):
        for k in ti.static(range(3)):
            for c in ti.static(range(2)):
                g_verts[b, f, k, c] = g_verts[b, f, k, c] + entry_grads[r, 2 * k + c]
            if ti.static(with_z):
                g_verts[b, f, k, 2] = g_verts[b, f, k, 2] + entry_grads[r, 6 + k]
            for c in ti.static(range(NA)):
                g_attrs[b, f, k, c] = g_attrs[b, f, k, c] + entry_grads[r, CORNER_SLOTS + k * NA + c]
            if ti.static(shaded):
                for c in ti.static(range(NT)):
                    g_shading[b, f, k, c] = (g_shading[b, f, k, c]
                                             + entry_grads[r, CORNER_SLOTS + 3 * NA + k * NT + c])


@ti.kernel
def reduce_entry_grads(face_start: nd, entry_grads: nd, g_verts: nd, g_attrs: nd, g_shading: nd, chunk: ti.i32,
                       NA: ti.template(), NT: ti.template(), shaded: ti.template(), with_z: ti.template()):
    """The deterministic backward's second step: for each (view, face), the face's entry_grads rows are added,
    in ascending tile order, to g_verts (B, F, 3, 3), g_attrs (B, F, 3, NA), g_shading (B, F, 3, NT) (zeroed;
    plain loads and stores, since no other thread writes this face's gradients). The sum depends on the
    tiling, not on the threads' timing: bitwise reproducible for a given tile size. One thread per (view,
    chunk of `chunk` consecutive faces): most faces have no rows, and a thread per face spent more time
    being scheduled than adding (measured on B1, 324k faces)."""
    F = g_verts.shape[1]
    for b, k in ti.ndrange(g_verts.shape[0], (F + chunk - 1) // chunk):
        for f in range(k * chunk, ti.min((k + 1) * chunk, F)):
            _reduce_face_rows(face_start, entry_grads, g_verts, g_attrs, g_shading, b, f, NA, NT, shaded, with_z)
