"""A synthetic IU X-ray / OpenI corpus in its published layout (FORMATS.md, DATASETS.md "OpenI").

``NLMCXR_reports.tgz`` holds ``ecgen-radiology/<n>.xml`` with ``AbstractText`` sections and
``parentImage`` ids; ``images/`` holds ``<parentImage id>.png`` as ``NLMCXR_png.tgz`` unpacks;
``indiana_projections.csv`` is Kaggle's projection table. Studies, findings and report text come from
the synthetic MIMIC world's plan (``pipeline.synth.mimic.plan_mimic``), so the pictures match the
words; a few reports have no image or empty sections, as in the real corpus.
"""
from __future__ import annotations

import gzip
import io
import logging
import tarfile
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image

from pipeline.common import MflagError, atomic_path, progress
from pipeline.synth.mimic import plan_mimic
from pipeline.synth.phantom import is_lateral, render

log = logging.getLogger(__name__)

_LABELS = (("COMPARISON", "comparison"), ("INDICATION", "indication"), ("FINDINGS", "findings"),
           ("IMPRESSION", "impression"))


def report_xml(number: int, sections: dict[str, str], image_ids: list[str]) -> str:
    """One ecgen-radiology XML as published (trimmed to the elements a reader uses)."""
    abstract = "\n".join(f'            <AbstractText Label="{label}">{escape(sections.get(name, ""))}</AbstractText>'
                         for label, name in _LABELS)
    images = "\n".join(f'   <parentImage id={quoteattr(i)}>\n      <figureId>F{k + 1}</figureId>\n'
                       f'      <caption>Xray Chest PA and Lateral</caption>\n   </parentImage>'
                       for k, i in enumerate(image_ids))
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation>\n   <meta type="rr"/>\n   <uId id="CXR{number}"/>\n'
            f'   <IUXRId id="{number}"/>\n   <MedlineCitation Owner="Indiana University">\n      <Article>\n'
            f'         <Abstract>\n{abstract}\n         </Abstract>\n      </Article>\n   </MedlineCitation>\n'
            f'{images}\n</eCitation>\n')


def write_openi(out_dir, n_reports: int, seed: int, image_size: int = 256) -> dict:
    """Write a synthetic OpenI corpus of ``n_reports`` reports into ``out_dir`` (an empty or missing folder).

    Returns a summary: counts and the paths to pass to ``prepare openi``."""
    out = Path(out_dir)
    # An interrupted earlier write (same names) is rewritten; anything else means another corpus is here.
    ours = {"images", "NLMCXR_reports.tgz", "indiana_projections.csv"}
    if out.exists() and any(p.name not in ours and not p.name.startswith(".") for p in out.iterdir()):
        raise MflagError(f"{out} holds files of something else; write a synthetic OpenI into an empty folder")
    studies = plan_mimic(n_reports, seed, image_size)
    rng = np.random.default_rng([seed, 0x4F50454E])
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    projections = ["uid,filename,projection"]
    n_images = n_no_image = 0
    members: list[tuple[str, bytes]] = []
    with progress(total=sum(len(s.images) for s in studies), desc="synth openi", unit="img") as bar:
        for number, st in enumerate(studies, start=1):
            # About 1 in 40 real reports lists no image; the first report always has one.
            no_image = number > 1 and rng.random() < 0.025
            ids = []
            for k, img in enumerate(st.images):
                bar.update(1)
                if no_image:
                    continue
                stem = f"{number}_IM-{number:04d}-{k + 1}001"
                ids.append(f"CXR{stem}")
                pixels, _ = render(st.findings, np.random.default_rng(list(img.seed)), (img.rows, img.cols),
                                   img.render_view)
                with atomic_path(images_dir / f"CXR{stem}.png") as tmp:
                    Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
                projections.append(f"{number},{stem}.dcm.png,{'Lateral' if is_lateral(img.render_view) else 'Frontal'}")
                n_images += 1
            n_no_image += no_image
            members.append((f"ecgen-radiology/{number}.xml", report_xml(number, st.report.sections, ids).encode()))
    with atomic_path(out / "indiana_projections.csv") as tmp:
        tmp.write_text("\n".join(projections) + "\n", encoding="utf-8")
    with atomic_path(out / "NLMCXR_reports.tgz") as tmp:
        # gzip mtime 0: the same arguments give the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
    summary = {"root": str(out), "reports": str(out / "NLMCXR_reports.tgz"), "images": str(images_dir),
               "projections": str(out / "indiana_projections.csv"), "n_reports": len(studies),
               "n_images": n_images, "reports_without_image": n_no_image, "seed": seed, "image_size": image_size}
    log.info("synthetic OpenI: %d reports, %d images in %s", len(studies), n_images, out)
    return summary
