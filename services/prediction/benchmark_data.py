"""Public labelled data shipped with the repository (see `data/README.md`)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import numpy.typing as npt

DATA = Path(__file__).parent / "data"


def ucr_135() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], int]:
    """KDD-TSAD / UCR series 135: (values, 0/1 labels, length of the anomaly-free prefix)."""
    with (DATA / "135_UCR_Anomaly_InternalBleeding16_TEST.csv").open() as handle:
        rows = list(csv.reader(handle))[1:]
    values = np.array([float(r[1]) for r in rows])
    labels = np.array([int(float(r[2])) for r in rows], dtype=np.int64)
    with (DATA / "135_UCR_Anomaly_InternalBleeding16_TRAIN.csv").open() as handle:
        train_length = len(list(csv.reader(handle))) - 1
    return values, labels, train_length
