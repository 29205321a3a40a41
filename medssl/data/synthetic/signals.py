"""ECG and PPG of the synthetic hospital: a cardiac profile per patient, a recording per trial.

Each patient has a heart rate, a P-QRS-T morphology (sums of Gaussians per beat), heart-rate
variability, a pulse transit time and a PPG pulse shape; each trial shifts the heart rate and draws
its own gain, noise, baseline wander and mains interference. Condition 1 (patient-level, half of the
patients: one of each consecutive pair P001/P002, P003/P004, ...) has atrial-fibrillation-like
irregular RR intervals with fibrillatory waves instead of P waves, and/or ST depression with a wider QRS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from medssl.data.synthetic.streams import CONDITION, HEART, stream_rng

SIGNAL_CHANNELS = ["ECG", "PPG"]
SIGNAL_UNITS = ["mV", "NU"]

# ECG beat template, one row per Gaussian wave: offset from the R peak (s), amplitude (mV), width (s)
_P, _Q, _R, _S, _ST, _T1, _T2 = range(7)
_ECG_WAVES = np.array([[-0.17, 0.12, 0.022], [-0.035, -0.10, 0.009], [0.0, 1.10, 0.011], [0.035, -0.28, 0.010],
                       [0.14, 0.0, 0.045], [0.25, 0.24, 0.050], [0.30, 0.12, 0.035]])
_QRS = [_Q, _R, _S]
# PPG pulse: systolic peak and diastolic wave, offsets from the pulse arrival (s), amplitude (NU), width (s)
_PPG_WAVES = np.array([[0.10, 1.0, 0.07], [0.30, 0.45, 0.09]])


@dataclass(frozen=True)
class _Heart:
    """A patient's cardiac profile."""

    rate_bpm: float
    ecg_waves: np.ndarray   # (7, 3) offset s, amplitude mV, width s
    ppg_waves: np.ndarray   # (2, 3) offset s, amplitude NU, width s
    transit_s: float        # R peak -> pulse arrival
    resp_hz: float
    rsa: float              # respiratory sinus arrhythmia, fraction of RR
    irregularity: float     # > 0: AF-like iid log-normal RR intervals (sd of log RR)
    f_wave_mv: float        # fibrillatory wave amplitude (AF only)
    ectopic_rate: float     # premature beats per beat


def condition(seed: int, patient: int) -> int:
    """Patient-level condition: exactly one patient of each pair (0, 1), (2, 3), ... has condition 1."""
    first_is_ill = stream_rng(seed, CONDITION, patient // 2).random() < 0.5
    return int((patient % 2 == 0) == first_is_ill)


def make_heart(seed: int, patient: int, condition: int) -> _Heart:
    rng = stream_rng(seed, HEART, patient)
    ecg = _ECG_WAVES.copy()
    ecg[:, 0] += rng.normal(0, 0.008, 7)
    ecg[_R, 0] = 0.0
    ecg[:, 1] *= np.exp(rng.normal(0, 0.25, 7))
    ecg[_R, 1] = np.clip(ecg[_R, 1], 0.7, 1.8)
    ecg[[_T1, _T2], 1] *= min(1.0, 0.45 * ecg[_R, 1] / ecg[[_T1, _T2], 1].sum())   # the R wave dominates
    ecg[:, 2] *= np.exp(rng.normal(0, 0.12, 7))
    ppg = _PPG_WAVES.copy()
    ppg[:, 0] += rng.normal(0, 0.015, 2)
    ppg[1, 1] *= np.exp(rng.normal(0, 0.3))
    ppg[:, 2] *= np.exp(rng.normal(0, 0.15, 2))
    af_draw, ischemia_draw, irregularity, f_wave, st_mv, widening = (
        rng.random(), rng.random(), rng.uniform(0.08, 0.16), rng.uniform(0.02, 0.05), rng.uniform(0.04, 0.12),
        rng.uniform(1.2, 1.5))
    af = bool(condition) and af_draw < 0.6
    if af:
        ecg[_P, 1] *= 0.1
    if condition and (not af or ischemia_draw < 0.4):
        ecg[_ST, 1] = -st_mv
        ecg[_QRS, 2] *= widening
        ecg[[_Q, _S], 0] *= widening
    return _Heart(rate_bpm=float(rng.uniform(55, 95)), ecg_waves=ecg, ppg_waves=ppg,
                  transit_s=float(rng.uniform(0.18, 0.28)), resp_hz=float(rng.uniform(0.2, 0.33)),
                  rsa=float(rng.uniform(0.02, 0.07)), irregularity=irregularity if af else 0.0,
                  f_wave_mv=f_wave if af else 0.0, ectopic_rate=float(rng.uniform(0, 0.02)))


def _beats(heart: _Heart, rr_mean: float, seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """R-peak times (B,) s and the RR interval ending at each (B,) s; the first beat precedes the recording."""
    count = int(np.ceil((seconds + 4) / (0.5 * rr_mean)))
    if heart.irregularity:
        rr = rr_mean * np.exp(heart.irregularity * rng.standard_normal(count) - heart.irregularity ** 2 / 2)
    else:
        drift = gaussian_filter1d(rng.standard_normal(count), 3)
        phase = 2 * np.pi * heart.resp_hz * rr_mean * np.arange(count) + rng.uniform(0, 2 * np.pi)
        rr = rr_mean * (1 + heart.rsa * np.sin(phase) + 0.05 * drift)
    ectopic = rng.random(count) < heart.ectopic_rate
    rr[ectopic] *= 0.65
    rr[1:][ectopic[:-1]] += 0.35 * rr_mean   # compensatory pause
    rr = np.maximum(rr, 0.3)
    times = np.cumsum(rr) - 2.0 - rng.uniform(0, rr_mean)
    keep = times < seconds + 0.5
    return times[keep], rr[keep]


def _wave_train(centres: np.ndarray, amps: np.ndarray, widths: np.ndarray, n: int, fs: float) -> np.ndarray:
    """Sum of Gaussians with centres (s), amplitudes and widths (s), all (B, W), sampled at n points -> (n,)."""
    half = int(np.ceil(4 * widths.max() * fs))
    index = np.rint(centres * fs).astype(np.int64)[..., None] + np.arange(-half, half + 1)
    values = amps[..., None] * np.exp(-0.5 * ((index / fs - centres[..., None]) / widths[..., None]) ** 2)
    valid = (index >= 0) & (index < n)
    return np.bincount(index[valid], weights=values[valid], minlength=n)


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """(n,) Gaussian noise smoothed over `sigma` samples, unit standard deviation. Drawn over at least 8 sigma:
    a recording shorter than the smoothing would otherwise be a nearly constant offset divided by its own tiny
    spread (a 2 s ECG 20 mV off zero). Recordings of 8 sigma or more are drawn as they always were."""
    noise = gaussian_filter1d(rng.standard_normal(max(n, int(np.ceil(8 * sigma)))), sigma)
    return noise[:n] / (noise.std() + 1e-12)


def trial_signals(heart: _Heart, rng: np.random.Generator, seconds: float, fs: float) -> np.ndarray:
    """One trial: (2, T) float32, ECG (mV) and PPG (NU), T = round(seconds * fs)."""
    n = int(round(seconds * fs))
    t = np.arange(n) / fs
    rr_mean = 60.0 / np.clip(heart.rate_bpm + rng.normal(0, 4), 40, 150)
    times, rr = _beats(heart, rr_mean, seconds, rng)
    breathing = np.sin(2 * np.pi * (heart.resp_hz + rng.normal(0, 0.02)) * times + rng.uniform(0, 2 * np.pi))
    ecg = heart.ecg_waves
    offsets = np.broadcast_to(ecg[:, 0], (len(times), 7)).copy()
    offsets[:, [_ST, _T1, _T2]] *= np.sqrt(rr)[:, None]   # QT follows the RR interval (Bazett)
    amps = ecg[:, 1] * np.exp(rng.normal(0, 0.05, 7)) * (1 + 0.05 * breathing)[:, None]
    widths = np.broadcast_to(ecg[:, 2], amps.shape)
    ecg_mv = _wave_train(times[:, None] + offsets, amps, widths, n, fs)
    if heart.f_wave_mv:
        frequency = rng.uniform(4.5, 7.0) + 0.8 * _smooth_noise(rng, n, fs)
        ecg_mv += heart.f_wave_mv * np.sin(2 * np.pi * np.cumsum(frequency) / fs)
    ppg = heart.ppg_waves
    stroke = (rr / rr_mean) ** 0.7 * (1 + 0.1 * breathing)
    pulses = _wave_train(times[:, None] + heart.transit_s + ppg[:, 0], stroke[:, None] * ppg[:, 1],
                         np.broadcast_to(ppg[:, 2], (len(times), 2)), n, fs)
    ppg_nu = gaussian_filter1d(pulses, 0.02 * fs)
    respiration = np.sin(2 * np.pi * heart.resp_hz * t + rng.uniform(0, 2 * np.pi))
    ecg_mv = (np.exp(rng.normal(0, 0.08)) * ecg_mv + rng.uniform(0.03, 0.2) * respiration
              + rng.uniform(0.02, 0.15) * _smooth_noise(rng, n, 1.5 * fs)
              + rng.uniform(0, 0.02) * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 2 * np.pi))
              + rng.uniform(0.01, 0.05) * rng.standard_normal(n))
    ppg_nu = (np.exp(rng.normal(0, 0.1)) * ppg_nu + rng.uniform(0.03, 0.12) * respiration
              + rng.uniform(0.005, 0.02) * rng.standard_normal(n))
    return np.stack([ecg_mv, ppg_nu]).astype(np.float32)
