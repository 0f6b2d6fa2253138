"""Taichi kernels of the soft rasterizer: tile binning, forward and hand-written backward.

The formulas are those of docs/design.md ("The soft rasterizer primitive"). Forward and backward evaluate
each (pixel, face) pair with the same ti.funcs, so the backward sees exactly the pairs the forward used.
Gradients are derived by hand rather than by Taichi's autodiff, which is wrong through loops on Vulkan.

Array layouts (Taichi ndarrays over torch tensors; NC = NA + NT channels):
    face_verts   (B, F, 3, 3)   per corner (u, v, z): pixel coordinates and camera depth
    face_attrs   (B, F, 3, NA)  per-corner attributes
    texture      (Bt, Ht, Wt, NT) with face_uvs (Bu, F, 3, 2) and face_shading (B, F, 3, NT)
    params       (8,)  see the slot names below; in the data's float type (f32 runs need no f64 support)
    tile_offsets (B * T + 1,) int32: tile s of view b lists tile_faces[offsets[b*T+s] : offsets[b*T+s+1]]
    alpha (B, H, W), image (B, H, W, NC), pix_to_face (B, H, W) int32,
    stats (B, H, W, 3) = [m, S, z]: the softmax shift and denominator (background included), for backward,
                   and the depth of the nearest covering face
"""


import warnings

import taichi as ti

nd = ti.types.ndarray()
# `vals.append` below runs at compile time on a Python list of Taichi expressions, which is intended.
warnings.filterwarnings("ignore", message='.*Calling non-taichi function "vals.append"')

SIGMA, CUTOFF, GAMMA, EPS, NEAR, FAR, RADIUS = range(7)  # slots of `params`
MIN_AREA2 = 1e-8  # |signed area * 2| in pixels² below which a face is degenerate and skipped


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
    """A face takes part if it is in front of the near plane, not degenerate, and not culled."""
    area2 = _cross(p1 - p0, p2 - p0)
    ok = z.min() >= near and ti.abs(area2) >= MIN_AREA2
    if ti.static(cull):
        ok = ok and area2 < 0  # front faces have negative signed area with y pointing down
    return ok


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
def _face_value_backward(face_attrs: ti.template(), texture: ti.template(), face_uvs: ti.template(),
                         face_shading: ti.template(), g_attrs: ti.template(), g_texture: ti.template(),
                         g_shading: ti.template(), b, f, wp, g_val, NA: ti.template(), NT: ti.template(),
                         shaded: ti.template(), fp: ti.template()):
    """Scatter dL/d(face value) to attributes, texture and shading; return dL/d(wp) (3,)."""
    g_wp = ti.Vector.zero(fp, 3)
    for c in ti.static(range(NA)):
        for k in ti.static(range(3)):
            g_wp[k] += g_val[c] * face_attrs[b, f, k, c]
            ti.atomic_add(g_attrs[b, f, k, c], g_val[c] * wp[k])
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
                    ti.atomic_add(g_shading[b, f, k, c], g_val[NA + c] * tex * wp[k])
            g_tex = g_val[NA + c] * sh
            ti.atomic_add(g_texture[bt, y0, x0, c], g_tex * (1 - fx) * (1 - fy))
            ti.atomic_add(g_texture[bt, y0, x1, c], g_tex * fx * (1 - fy))
            ti.atomic_add(g_texture[bt, y1, x0, c], g_tex * (1 - fx) * fy)
            ti.atomic_add(g_texture[bt, y1, x1, c], g_tex * fx * fy)
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


# ----------------------------------------------------------------------------------------------------
# Binning: which faces may touch which screen tiles (bounding box grown by the coverage cut-off radius).


@ti.func
def _tile_range(face_verts: ti.template(), params: ti.template(), b, f, width, height, tile,
                cull: ti.template(), fp: ti.template()):
    """Tiles (tx0..tx1, ty0..ty1) reached by face f's window; an empty range when it takes no part."""
    p0, p1, p2, z = _corners(face_verts, b, f, fp)
    tx0, tx1, ty0, ty1 = 0, -1, 0, -1
    if _face_ok(p0, p1, p2, z, params[NEAR], cull):
        lo, hi = ti.min(p0, p1, p2), ti.max(p0, p1, p2)
        x0, x1 = _pixel_range(lo[0], hi[0], params[RADIUS], width)
        y0, y1 = _pixel_range(lo[1], hi[1], params[RADIUS], height)
        if x0 <= x1 and y0 <= y1:
            tx0, tx1, ty0, ty1 = x0 // tile, x1 // tile, y0 // tile, y1 // tile
    return tx0, tx1, ty0, ty1


# One thread per view walks its faces in order, with plain loads and stores: every tile then lists its faces
# in ascending order, so the forward sums in a fixed order (deterministic, the same on every backend), and
# no integer atomics are needed (measured: on Vulkan/lavapipe, integer atomics inside a loop with a
# run-time bound drop all but the first two iterations).


@ti.kernel
def count_tiles(face_verts: nd, params: nd, counts: nd, width: ti.i32, height: ti.i32, tile: ti.i32,
                tiles_x: ti.i32, cull: ti.template(), fp: ti.template()):
    for b in range(face_verts.shape[0]):
        for f in range(face_verts.shape[1]):
            tx0, tx1, ty0, ty1 = _tile_range(face_verts, params, b, f, width, height, tile, cull, fp)
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    counts[b, ty * tiles_x + tx] = counts[b, ty * tiles_x + tx] + 1


@ti.kernel
def fill_tiles(face_verts: nd, params: nd, offsets: nd, cursor: nd, tile_faces: nd, width: ti.i32,
               height: ti.i32, tile: ti.i32, tiles_x: ti.i32, cull: ti.template(), fp: ti.template()):
    for b in range(face_verts.shape[0]):
        for f in range(face_verts.shape[1]):
            tx0, tx1, ty0, ty1 = _tile_range(face_verts, params, b, f, width, height, tile, cull, fp)
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    s = ty * tiles_x + tx
                    c = cursor[b, s]
                    tile_faces[offsets[b * cursor.shape[1] + s] + c] = f
                    cursor[b, s] = c + 1


@ti.kernel
def face_setup(face_verts: nd, params: nd, setup: nd, fp: ti.template()):
    for b, f in ti.ndrange(face_verts.shape[0], face_verts.shape[1]):
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
            setup[b, f, 13 + k] = length / abs_area2
            setup[b, f, 16 + k] = 1.0 / (length * length)


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
    one_minus_d = 1.0 / (1.0 + ti.exp(xs))  # sigmoid(-x); exp overflow gives exactly 0
    alpha[b, y, x] *= one_minus_d
    if ti.static(NA + NT > 0):
        zn = (far - zp) / (far - near)
        m = stats[b, y, x, 0]
        scale = ti.cast(1.0, fp)
        if zn > m:  # a new maximum: rescale what was summed so far (a streaming softmax)
            scale = ti.exp((m - zn) / gamma)
            m = zn
            stats[b, y, x, 0] = m
        e = ti.exp((zn - m) / gamma) * (1.0 - one_minus_d)
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
                    if f >= 0:  # the nearest covering face's value
                        S, _p0, _p1, _p2, z = _load_face(setup, face_verts, b, f, fp)
                        _near, s_lines = _coverage(S, ti.Vector([x + 0.5, y + 0.5], dt=fp), radius, fp)
                        wp, _zp, _wc, _q = _perspective(_barycentrics(S, s_lines), z)
                        val = _face_value(face_attrs, texture, face_uvs, face_shading, b, f, wp, NA, NT, shaded, fp)
                        for c in ti.static(range(max(NA + NT, 1))):
                            image[b, y, x, c] = val[c]
                else:
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
                   g_shading: ti.template(), b, y, x, f, S, p0, p1, p2, z,
                   NA: ti.template(), NT: ti.template(), shaded: ti.template(), hard: ti.template(),
                   fp: ti.template()):
    """Gradient of pixel (b, y, x) through face f, if the pair was selected: scatters to the face's
    attributes, texture and shading, and returns the corner gradients (g_p0, g_p1, g_p2) (2,) and g_z (3,)."""
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
            D = 1.0 / (1.0 + ti.exp(-xs))
            g_x = g_alpha[b, y, x] * (1.0 - alpha[b, y, x]) * D  # d alpha / d x_j = (1 - alpha) * D_j
            if ti.static(NA + NT > 0):
                img = ti.Vector([image[b, y, x, c] for c in ti.static(range(NA + NT))], dt=fp)
                m, denom = stats[b, y, x, 0], stats[b, y, x, 1]
                zn = (far - zp) / (far - near)
                ez = ti.exp((zn - m) / gamma)
                weight = D * ez / denom
                val = _face_value(face_attrs, texture, face_uvs, face_shading, b, f, wp, NA, NT, shaded, fp)
                proj = g_img.dot(val - img)
                g_x += proj * ez / denom * D * (1.0 - D)
                g_zp = -proj * weight / gamma / (far - near)
                g_val = g_img * weight
        if ti.static(NA + NT > 0):
            g_wp = _face_value_backward(face_attrs, texture, face_uvs, face_shading, g_attrs, g_texture,
                                        g_shading, b, f, wp, g_val, NA, NT, shaded, fp)
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


@ti.kernel
def rasterize_backward(face_verts: nd, face_attrs: nd, texture: nd, face_uvs: nd, face_shading: nd,
                       setup: nd, params: nd, offsets: nd, tile_faces: nd,
                       alpha: nd, image: nd, pix_to_face: nd, stats: nd, g_alpha: nd, g_image: nd,
                       g_verts: nd, g_attrs: nd, g_texture: nd, g_shading: nd,
                       tile: ti.i32, tiles_x: ti.i32, n_tiles: ti.i32,
                       NA: ti.template(), NT: ti.template(), shaded: ti.template(), hard: ti.template(),
                       cull: ti.template(), fp: ti.template(), block: ti.template()):
    ti.loop_config(block_dim=block)
    for b, ty, tx in ti.ndrange(alpha.shape[0], n_tiles // tiles_x, tiles_x):
        x0, y0, x1, y1 = _tile(alpha, b, ty, tx, tile)
        if ti.static(hard):
            # Only the visible face's value depends on anything smooth.
            for y in range(y0, y1 + 1):
                for x in range(x0, x1 + 1):
                    f = pix_to_face[b, y, x]
                    if f >= 0:
                        S, p0, p1, p2, z = _load_face(setup, face_verts, b, f, fp)
                        g_p0, g_p1, g_p2, g_z = _pair_backward(
                            face_verts, face_attrs, texture, face_uvs, face_shading, params, alpha, image, stats,
                            g_alpha, g_image, g_attrs, g_texture, g_shading, b, y, x, f, S, p0, p1, p2, z,
                            NA, NT, shaded, hard, fp)
                        _add_corner_grads(g_verts, b, f, g_p0, g_p1, g_p2, g_z, NA + NT > 0)
        else:
            for i in range(offsets[b * n_tiles + ty * tiles_x + tx], offsets[b * n_tiles + ty * tiles_x + tx + 1]):
                f = tile_faces[i]
                S, p0, p1, p2, z = _load_face(setup, face_verts, b, f, fp)
                xa, xb, ya, yb = _tile_pixels(S, x0, y0, x1, y1)
                # The face's corner gradients, summed over this tile's pixels, then added once.
                g_p0, g_p1, g_p2 = (ti.Vector([0.0, 0.0], dt=fp), ti.Vector([0.0, 0.0], dt=fp),
                                    ti.Vector([0.0, 0.0], dt=fp))
                g_z = ti.Vector([0.0, 0.0, 0.0], dt=fp)
                for y in range(ya, yb + 1):  # nested ranges: ndrange divides per step
                    for x in range(xa, xb + 1):
                        if ti.static(NA + NT == 0):
                            if alpha[b, y, x] == 1.0 or g_alpha[b, y, x] == 0:
                                continue  # every pair's gradient g * (1 - alpha) * D is exactly zero here
                        d_p0, d_p1, d_p2, d_z = _pair_backward(
                            face_verts, face_attrs, texture, face_uvs, face_shading, params, alpha, image, stats,
                            g_alpha, g_image, g_attrs, g_texture, g_shading, b, y, x, f, S, p0, p1, p2, z,
                            NA, NT, shaded, hard, fp)
                        g_p0 += d_p0
                        g_p1 += d_p1
                        g_p2 += d_p2
                        g_z += d_z
                _add_corner_grads(g_verts, b, f, g_p0, g_p1, g_p2, g_z, NA + NT > 0)
