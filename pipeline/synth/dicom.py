"""DICOM files like the SIIM / RSNA releases: CR, 8-bit, JPEG Baseline encapsulated pixel data."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# The SIIM/RSNA releases were converted with DCMTK under this implementation UID root.
UID_ROOT = "1.2.276.0.7230010.3"


def siim_uids(rng: np.random.Generator) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs in the pattern of the SIIM release, where the three share a
    process id and timestamp and their last component counts down."""
    pid = int(rng.integers(1000, 15000))
    stamp = 1517875000 + int(rng.integers(0, 300))
    last = int(rng.integers(100000, 999990))
    study = f"{UID_ROOT}.1.2.8323329.{pid}.{stamp}.{last - 1}"
    series = f"{UID_ROOT}.1.3.8323329.{pid}.{stamp}.{last - 2}"
    sop = f"{UID_ROOT}.1.4.8323329.{pid}.{stamp}.{last}"
    return study, series, sop


def write_dicom(path, image: np.ndarray, *, sop_uid: str, study_uid: str, series_uid: str,
                patient_id: str, view: str = "PA", monochrome1: bool = False,
                pixel_spacing: float = 0.168, sex: str = "M", age: int = 50, quality: int = 92) -> None:
    """Write a uint8 HxW display image as a JPEG Baseline CR DICOM, atomically.

    With ``monochrome1`` the stored pixels are inverted and PhotometricInterpretation says
    MONOCHROME1, so a reader that inverts MONOCHROME1 recovers ``image`` (up to JPEG loss).
    """
    # pydicom is needed here only: the other synthetic writers (and the GPU smoke test's CheXpert)
    # work where it is not installed.
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 HxW image, got {image.dtype} {image.shape}")
    stored = 255 - image if monochrome1 else image
    buf = io.BytesIO()
    # Baseline (non-progressive) JPEG of one 8-bit channel is what transfer syntax .4.50 means.
    Image.fromarray(stored, mode="L").save(buf, format="JPEG", quality=quality, progressive=False)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = f"{UID_ROOT}.0.3.6.0"
    meta.ImplementationVersionName = "OFFIS_DCMTK_360"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    ds.PatientAge = f"{int(age):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.PixelSpacing = [f"{pixel_spacing:.6g}", f"{pixel_spacing:.6g}"]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
