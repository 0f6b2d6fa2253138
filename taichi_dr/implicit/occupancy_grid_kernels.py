"""Taichi kernels of :class:`taichi_dr.implicit.occupancy_grid.OccupancyGrid`: sample marching through the
occupied cells (a count pass, then a fill pass into packed samples) and the per-ray interval of occupied cells
(a 3D DDA). One thread per ray, forward only; see the grid module's docstring for what they compute and why
they agree with a brute-force filter of all samples.
"""

import taichi as ti

from taichi_dr.core import runtime

_BIG = 1e30                   # "infinity" in the kernels (finite: fast math may not keep inf)
_K_LIMIT = 2.0e9              # sample indices stay below this (int32 in the kernels)


# ---------------------------------------------------------------------------------------------------------
# Kernels. ``box`` is a (4, 3) array in the rays' dtype: rows lo, hi, resolution / (hi - lo), (hi - lo) /
# resolution; ``occ`` the (Rx, Ry, Rz) uint8 occupied mask. Every array a kernel writes is written in full
# (on Vulkan, elements a kernel leaves alone would come back as stale device memory).


@ti.func
def _load_ray(r, origins: ti.template(), dirs: ti.template()):
    o = ti.Vector([origins[r, 0], origins[r, 1], origins[r, 2]])
    d = ti.Vector([dirs[r, 0], dirs[r, 1], dirs[r, 2]])
    return o, d


@ti.func
def _box_range(o, d, box: ti.template()):
    """The ray's parameter range ``[t0, t1]`` inside the box (t0 > t1 when it misses)."""
    zero = o[0] * 0.0
    t0 = zero - _BIG
    t1 = zero + _BIG
    for a in ti.static(range(3)):
        if d[a] != 0.0:
            ta = (box[0, a] - o[a]) / d[a]
            tb = (box[1, a] - o[a]) / d[a]
            t0 = ti.max(t0, ti.min(ta, tb))
            t1 = ti.min(t1, ti.max(ta, tb))
        elif o[a] < box[0, a] or o[a] > box[1, a]:
            t0 = zero + _BIG
            t1 = zero - _BIG
    return t0, t1


@ti.func
def _cell_exit(o, d, c, box: ti.template()):
    """The ray parameter where the ray leaves cell ``c`` (recomputed from the index: no accumulated error),
    and the axis it leaves through."""
    t = o[0] * 0.0 + _BIG
    axis = 0
    for a in ti.static(range(3)):
        ta = o[0] * 0.0 + _BIG
        if d[a] > 0.0:
            ta = (box[0, a] + (c[a] + 1) * box[3, a] - o[a]) / d[a]
        elif d[a] < 0.0:
            ta = (box[0, a] + c[a] * box[3, a] - o[a]) / d[a]
        if ta < t:
            t = ta
            axis = a
    return t, axis


@ti.func
def _safe_exit(o, d, c, size_row: ti.template(), box: ti.template(), rel):
    """A ray parameter up to which the ray surely stays in the cell (``size_row`` 3) or block (4) ``c`` once
    inside it: the earliest exit through a face, each less a margin of a few ulps of what rounds in computing
    it and the samples' cells, ``rel * (|t_a| + (|o_a| + max(|lo_a|, |hi_a|)) / |d_a|)``."""
    t = o[0] * 0.0 + _BIG
    for a in ti.static(range(3)):
        if d[a] != 0.0:
            ta = o[0] * 0.0
            if d[a] > 0.0:
                ta = (box[0, a] + (c[a] + 1) * box[size_row, a] - o[a]) / d[a]
            else:
                ta = (box[0, a] + c[a] * box[size_row, a] - o[a]) / d[a]
            t = ti.min(t, ta - rel * (ti.abs(ta) + (ti.abs(o[a]) + box[5, a]) / ti.abs(d[a])))
    return t


@ti.func
def _skip_to(k, target, tn, step, jitter):
    """The last sample index at or before ``target`` (one step of slack against rounding), at least k + 1."""
    kf = ti.min((target - tn) / step - jitter, _K_LIMIT)
    kn = ti.cast(ti.floor(kf), ti.i32)
    return ti.max(k + 1, kn)


@ti.func
def _skip_past(k, target, tn, step, jitter):
    """The first sample index after ``target`` (a safe exit: the samples up to it are in the same empty cell),
    at least k + 1."""
    kf = ti.min((target - tn) / step - jitter, _K_LIMIT)
    kn = ti.cast(ti.floor(kf), ti.i32) + 1
    return ti.max(k + 1, kn)


@ti.func
def _march_ray(r, origins: ti.template(), dirs: ti.template(), t_near: ti.template(), t_far: ti.template(),
               jitter: ti.template(), params: ti.template(), box: ti.template(), occ: ti.template(),
               coarse: ti.template(), block, max_n, t_out: ti.template(), ray_index: ti.template(), base,
               write: ti.template()):
    """Ray r's samples ``t_near + (k + jitter) * step < t_far`` in occupied cells, in order; written from
    ``base`` on when ``write``; returns how many (at most ``max_n``). From a sample in an empty cell it jumps
    past that cell, or past its ``block``^3 block when the whole block is empty (``coarse``)."""
    o, d = _load_ray(r, origins, dirs)
    tn = t_near[r]
    tf = t_far[r]
    step = params[0]
    rel = params[1]
    j = jitter[r]
    res = ti.Vector([occ.shape[0], occ.shape[1], occ.shape[2]])
    lo = ti.Vector([box[0, 0], box[0, 1], box[0, 2]])
    scale = ti.Vector([box[2, 0], box[2, 1], box[2, 2]])
    count = 0
    if tf > tn:
        tb0, tb1 = _box_range(o, d, box)
        if tb0 <= tb1 and tb1 >= tn:
            k = ti.max(_skip_to(-1, ti.min(ti.max(tb0, tn), tf), tn, step, j), 0)
            while count < max_n and k < _K_LIMIT:
                t = tn + (k + j) * step
                if t >= tf:
                    break
                u = (o + t * d - lo) * scale
                if u[0] >= 0 and u[1] >= 0 and u[2] >= 0 and u[0] < res[0] and u[1] < res[1] and u[2] < res[2]:
                    c = ti.min(ti.cast(ti.floor(u), ti.i32), res - 1)
                    if occ[c[0], c[1], c[2]] != 0:
                        if ti.static(write):
                            t_out[base + count] = t
                            ray_index[base + count] = r
                        count += 1
                        k += 1
                    else:
                        cb = c // block
                        target = o[0] * 0.0
                        if coarse[cb[0], cb[1], cb[2]] == 0:
                            target = _safe_exit(o, d, cb, 4, box, rel)
                        else:
                            target = _safe_exit(o, d, c, 3, box, rel)
                        k = _skip_past(k, ti.min(target, tf), tn, step, j)
                else:
                    if t >= tb1:
                        break
                    k = _skip_to(k, ti.min(tb0, tf), tn, step, j)
    return count


@runtime.locked
@ti.kernel
def _march_count_kernel(origins: ti.types.ndarray(), dirs: ti.types.ndarray(), t_near: ti.types.ndarray(),
                        t_far: ti.types.ndarray(), jitter: ti.types.ndarray(), params: ti.types.ndarray(),
                        box: ti.types.ndarray(), occ: ti.types.ndarray(), coarse: ti.types.ndarray(),
                        block: ti.i32, max_n: ti.i32, counts: ti.types.ndarray()):
    for r in range(origins.shape[0]):
        counts[r] = _march_ray(r, origins, dirs, t_near, t_far, jitter, params, box, occ, coarse, block, max_n,
                               counts, counts, 0, False)


@runtime.locked
@ti.kernel
def _march_fill_kernel(origins: ti.types.ndarray(), dirs: ti.types.ndarray(), t_near: ti.types.ndarray(),
                       t_far: ti.types.ndarray(), jitter: ti.types.ndarray(), params: ti.types.ndarray(),
                       box: ti.types.ndarray(), occ: ti.types.ndarray(), coarse: ti.types.ndarray(),
                       block: ti.i32, max_n: ti.i32, offsets: ti.types.ndarray(), t_out: ti.types.ndarray(),
                       ray_index: ti.types.ndarray()):
    for r in range(origins.shape[0]):
        if offsets[r + 1] > offsets[r]:
            _march_ray(r, origins, dirs, t_near, t_far, jitter, params, box, occ, coarse, block, max_n, t_out,
                       ray_index, offsets[r], True)


@runtime.locked
@ti.kernel
def _intervals_kernel(origins: ti.types.ndarray(), dirs: ti.types.ndarray(), t_near: ti.types.ndarray(),
                      t_far: ti.types.ndarray(), params: ti.types.ndarray(), box: ti.types.ndarray(),
                      occ: ti.types.ndarray(), t_start: ti.types.ndarray(), t_end: ti.types.ndarray(),
                      hit: ti.types.ndarray()):
    """Per ray, walk the cells it crosses inside ``[t_near, t_far]`` (3D DDA): the entry into the first
    occupied one and the exit from the last, padded by a few ulps and clipped to ``[t_near, t_far]``."""
    for r in range(origins.shape[0]):
        o, d = _load_ray(r, origins, dirs)
        tn = t_near[r]
        tf = t_far[r]
        res = ti.Vector([occ.shape[0], occ.shape[1], occ.shape[2]])
        lo = ti.Vector([box[0, 0], box[0, 1], box[0, 2]])
        scale = ti.Vector([box[2, 0], box[2, 1], box[2, 2]])
        ts = tf
        te = tf
        found = 0
        if tf > tn:
            tb0, tb1 = _box_range(o, d, box)
            t0 = ti.max(tn, tb0)
            t1 = ti.min(tf, tb1)
            if t0 < t1:
                u = (o + t0 * d - lo) * scale
                c = ti.cast(ti.floor(u), ti.i32)
                for a in ti.static(range(3)):
                    if d[a] < 0.0 and c[a] == u[a]:
                        c[a] -= 1            # on a cell face, moving down: the ray goes on in the cell below
                c = ti.max(ti.min(c, res - 1), 0)
                tc = t0
                n_cells = res[0] + res[1] + res[2] + 3
                for _ in range(n_cells):
                    t_exit, axis = _cell_exit(o, d, c, box)
                    t_out = ti.min(t_exit, t1)
                    if occ[c[0], c[1], c[2]] != 0 and t_out >= tc:
                        if found == 0:
                            ts = tc
                            found = 1
                        te = t_out
                    if t_exit >= t1:
                        break
                    inside = 1
                    for a in ti.static(range(3)):
                        if a == axis:
                            if d[a] > 0.0:
                                c[a] += 1
                            else:
                                c[a] -= 1
                            if c[a] < 0 or c[a] >= res[a]:
                                inside = 0
                    if inside == 0:
                        break
                    tc = ti.max(tc, t_exit)
            if found == 1:
                # a sample's cell is computed from its point, rounded: pad by a few ulps so that every sample
                # in an occupied cell lies inside [ts, te]
                mag = ti.abs(o[0]) + ti.abs(o[1]) + ti.abs(o[2]) + params[1]
                ts = ti.max(tn, ts - params[0] * (ti.abs(ts) + mag))
                te = ti.min(tf, te + params[0] * (ti.abs(te) + mag))
        t_start[r] = ts
        t_end[r] = te
        hit[r] = found


# ---------------------------------------------------------------------------------------------------------
# Argument checks
