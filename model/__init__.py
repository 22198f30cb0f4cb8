"""meterwatch's model: a conditional autoencoder that scores household-days of smart-meter data.

Public API (``stream`` imports these; ``model`` never imports ``stream``)::

    ModelConfig, ConditionalAutoencoder      # network hyper-parameters and the network
    ContextTables, context_features, N_CONTEXT
    Detector, HouseholdState, DayScores, SIGNAL_NAMES
    SyntheticConfig, SyntheticData, generate, ANOMALY_TYPES
    TrainConfig, train_detector
    score_frame                              # score a pandas DataFrame (long or wide)

Data conventions: a day is an int32 count of days since 1970-01-01 (local calendar date);
readings are float32 ``(N, 48)`` kWh per half-hour, slot i starting i*30 min after local
midnight, NaN where missing.

Typical use::

    det = Detector.load("model.pt", device="auto")    # dtype="bfloat16" on a GPU if wanted
    state = HouseholdState.empty(len(ids))            # or the stored rows of these households
    out = det.score(kwh, day, ids, state, tables)     # DayScores; inputs are not modified
    alerts = np.flatnonzero(out.is_alert)             # out.signal_names(i) says why,
    top = np.argsort(-out.slot_error[i])[:4]          # out.slot_error which half-hours
    store(out.state)                                  # per-household state for the next day

``HouseholdState`` holds one row per household: scalars (``level``, ``err_mean``,
``err_var``, ``count``, ``peak_*``, ``ratio_*``, ``timing_*``, ``fault_rate``) and a 12-block
time-of-day profile (``profile_mean``/``profile_var``, (N, 12)); ``row(i)`` /
``from_rows(rows)`` convert to and from ``dict[str, float]``. Keep every field.

A pandas DataFrame of readings (long: household_id, ts, kwh; wide: household_id, date,
hh_0 .. hh_47) is scored with ``score_frame(det, frame)`` (``model.frames``; needs
``pip install 'meterwatch[api]'``).

Other modules: ``model.loaders`` (LCL readings and side tables), ``model.inject`` (anomaly
injection), ``model.evaluate`` (``main(argv)``: the real-data benchmark), ``model.scoring``
and ``model.quality`` (how errors and rules become scores), ``model.state``.
"""

from meterwatch.model.detector import SIGNAL_NAMES, DayScores, Detector, HouseholdState
from meterwatch.model.features import N_CONTEXT, ContextTables, context_features
from meterwatch.model.frames import score_frame
from meterwatch.model.network import ConditionalAutoencoder, ModelConfig
from meterwatch.model.synthetic import ANOMALY_TYPES, SyntheticConfig, SyntheticData, generate
from meterwatch.model.training import TrainConfig, train_detector

__all__ = [
    "ANOMALY_TYPES",
    "N_CONTEXT",
    "SIGNAL_NAMES",
    "ConditionalAutoencoder",
    "ContextTables",
    "DayScores",
    "Detector",
    "HouseholdState",
    "ModelConfig",
    "SyntheticConfig",
    "SyntheticData",
    "TrainConfig",
    "context_features",
    "generate",
    "score_frame",
    "train_detector",
]
