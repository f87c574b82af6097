"""What a model looks at: LayerCAM maps for every stage of a network, as the two-step transfer (THTL) paper drew
them, for `tltrain explain`, the demo's report and the model card.

  layercam  one raw map per layer from the grad-cam library (its LayerCAM), then the LayerCAM paper's own scaling
            and fusion (the library averages several layers' min-max-scaled maps instead: not the paper's rule)
  geometry  where an input pixel lies in the original photograph (the inverse of the disc crop and resize)
  render    the per-image PNG row, the contact sheet, the overlays
  models    a package or a run folder as (model, preprocessing, what its outputs mean)
  command   `tltrain explain`: images -> maps (.npz, PNG rows, maps on the photo), contact sheet, predictions CSV
  pointing  a measure where the truth is known: pointing game and energy inside the lesion region, against a
            uniform map
"""
