"""ECG data: from a hospital's folder (or S3 prefix) of WFDB records to the trainer's tensors.

- ``records``    read + validate one WFDB record (``.hea`` + ``.mat``/``.dat``); quarantine reasons
- ``labels``     Challenge 2021 scored SNOMED-CT diagnoses, equivalent codes, class selection;
                 which ``# Dx`` tokens are SNOMED CT concept ids at all
- ``quality``    signal quality of a raw record (flat, clipped, noisy, reversed leads...): what
                 ingestion quarantines and predict / serve answer "unreadable"
- ``sources``    local folders and ``s3://bucket/prefix`` (boto3), path-traversal safe; record
                 ids are paths, keys across sites ``<site>/<id>``
- ``ingest``     manifest + quarantine report, incremental by content hash; a record is
                 (site, path), only byte-identical records are duplicates
- ``preprocess`` resample / band-pass / standardise / fix length -> the store
- ``store``      ``ECGStore`` (memory-mapped (N, 12, 6144) float32 + table), ``StoreDataset``
- ``splits``     multi-label stratified test / train / valid / unlabelled id lists
- ``synth``      synthetic hospitals written as Challenge-format WFDB (+ faulty records), and
                 networks of them with site shift (``synthesize_network``)
- ``dvc``        demo data in ``data/``, ``data.dvc`` versions, adding hospitals

Modules are imported on demand (nothing heavy happens on ``import ml.data``).
"""
