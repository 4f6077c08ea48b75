"""A synthetic chest X-ray world in the real datasets' formats (see docs/DESIGN.md).

``phantom`` draws radiographs with known finding geometry, ``reports`` writes MIMIC-style report
text and CheXpert-style labels, ``mimic`` writes a MIMIC-CXR-JPG tree and ``downstream`` the
CheXpert, RSNA, COVIDx, SIIM and Object-CXR sets. Nothing is imported here so that importing the
package stays cheap.
"""
