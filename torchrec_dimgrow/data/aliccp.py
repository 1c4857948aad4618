"""Ali-CCP as torch-rechub preprocesses it: the input of the ERASE and DimGrow code.

``ali_ccp_{train,val,test}.csv`` with a header: ``click`` (the label), ``purchase``, 23
label-encoded id columns (``101``, ``121`` ... ``150_14``) and 8 normalised dense columns
(``D109_14`` ... ``D853``). Like the DimGrow code, the search uses the 23 id columns as
fields and drops the rest. ``purchase`` must go: it is the conversion label of the CVR
task (a purchase implies a click), so as a field it would leak the label. The dense
columns are continuous values that a categorical table would only memorise.
"""

from __future__ import annotations

from pathlib import Path

from torchrec_dimgrow.data.csv_stream import header_names
from torchrec_dimgrow.data.tabular import CSV_DIALECT, CsvTableReader

LABEL = "click"
CONVERSION = "purchase"


def dropped_columns(header: list[str]) -> list[str]:
    """Columns that are not fields: the conversion label and the dense ``D*`` columns."""
    return [CONVERSION, *(name for name in header if name.startswith("D"))]


def aliccp_reader(train_path: Path) -> CsvTableReader:
    """A CSV reader with Ali-CCP's label and dropped columns (named errors if they are absent)."""
    return CsvTableReader(train_path, LABEL, dropped_columns(header_names(train_path, CSV_DIALECT)))
