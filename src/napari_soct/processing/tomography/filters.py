"""Frequency-domain filters of filtered back projection (Kak & Slaney, ch. 3), as scikit-image defines them."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FILTER_CHOICES", "fourier_filter", "filter_length", "filter_projections"]

FILTER_CHOICES = ("ramp", "shepp-logan", "cosine", "hamming", "hann", "none")


def filter_length(n_detectors: int) -> int:
    """FFT length for projections of ``n_detectors`` samples: a power of two, at least twice as long (so the
    circular convolution does not wrap onto the data) and at least 64."""
    return max(64, 2 ** math.ceil(math.log2(2 * n_detectors)))


def _normalise_name(name) -> str:
    name = "none" if name is None else str(name).lower()
    if name not in FILTER_CHOICES:
        raise ValueError(f"filter must be one of {', '.join(FILTER_CHOICES)} (or None), got {name!r}")
    return name


def fourier_filter(size: int, name="ramp") -> np.ndarray:
    """The real, even filter of an FFT of length ``size`` (all ``size`` frequencies, numpy FFT order).

    The ramp is the transform of its band-limited spatial kernel (1/4 at 0, -1/(pi n)^2 at odd n, 0 at even
    n; Kak & Slaney eq. 3.61), which avoids the DC bias of a sampled |f|. The windows multiply it:
    shepp-logan ``sinc``, cosine, and numpy's Hamming and Hann windows centred on zero frequency. A window
    that is not exactly even (numpy's windows peak between two samples) acts on a real signal through its
    even part, so that is what is returned. ``None``/"none" is all ones (no filtering).
    """
    if size < 2 or size % 2:
        raise ValueError(f"filter size must be even and >= 2, got {size}")
    name = _normalise_name(name)
    if name == "none":
        return np.ones(size)
    k = np.arange(size)
    distance = np.minimum(k, size - k)  # circular distance to sample 0
    kernel = np.zeros(size)
    kernel[0] = 0.25
    odd = distance % 2 == 1
    kernel[odd] = -1.0 / (np.pi * distance[odd]) ** 2
    response = 2.0 * np.real(np.fft.fft(kernel))
    freq = np.fft.fftfreq(size)
    if name == "shepp-logan":
        omega = np.pi * freq[1:]
        response[1:] *= np.sin(omega) / omega
    elif name == "cosine":
        response *= np.cos(np.pi * np.abs(freq))
    elif name == "hamming":
        response *= np.fft.fftshift(np.hamming(size))
    elif name == "hann":
        response *= np.fft.fftshift(np.hanning(size))
    return 0.5 * (response + np.roll(response[::-1], 1))


def filter_projections(projections, name="ramp", *, length: int | None = None, out_range=None, xp=np,
                       workers: int = 1):
    """Filter projections (one per row: ``(n_angles, n_detectors)``) along the detector axis.

    Parameters
    ----------
    projections : array (n_angles, n_detectors)
    name : str or None
        One of :data:`FILTER_CHOICES`.
    length : int, optional
        FFT length (default :func:`filter_length` of the detector count).
    out_range : (start, stop), optional
        Detector indices of the result, relative to the first detector (may start below 0 and end past the
        last detector: the filtered signal there is the convolution tail); default ``(0, n_detectors)``.
    workers : int
        FFT threads (numpy backend).

    Returns
    -------
    array (n_angles, stop - start), float32
    """
    name = _normalise_name(name)
    n_angles, n_det = projections.shape
    start, stop = out_range or (0, n_det)
    if name == "none":
        out = xp.zeros((n_angles, stop - start), dtype=xp.float32)
        lo, hi = max(start, 0), min(stop, n_det)
        out[:, lo - start : hi - start] = projections[:, lo:hi]
        return out
    length = length or filter_length(n_det)
    if stop - start > length:
        raise ValueError(f"output range {stop - start} longer than the FFT length {length}")
    response = xp.asarray(fourier_filter(length, name)[: length // 2 + 1].astype(np.float32))
    data = xp.asarray(projections, dtype=xp.float32)
    if xp is np:
        import scipy.fft

        spectrum = scipy.fft.rfft(data, n=length, axis=1, workers=workers)
        spectrum *= response
        filtered = scipy.fft.irfft(spectrum, n=length, axis=1, workers=workers)
    else:
        spectrum = xp.fft.rfft(data, n=length, axis=1)
        spectrum *= response
        filtered = xp.fft.irfft(spectrum, n=length, axis=1)
    index = np.arange(start, stop) % length  # negative indices: the circular convolution's wrap-around
    return xp.ascontiguousarray(filtered[:, xp.asarray(index)].astype(xp.float32, copy=False))
