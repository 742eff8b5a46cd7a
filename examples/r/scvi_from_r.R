# Train cellvi's SCVI from R through reticulate and bring the latent space back to R.
#
#   RETICULATE_PYTHON=/path/to/python-with-cellvi Rscript examples/r/scvi_from_r.R [out.csv]
#
# The counts start as an R sparse matrix (dgCMatrix, genes x cells) with a data.frame of
# cell metadata, as they would come out of a SingleCellExperiment or Seurat object.
suppressPackageStartupMessages({
  library(reticulate)
  library(Matrix)
})

args <- commandArgs(trailingOnly = TRUE)
out_csv <- if (length(args) >= 1) args[[1]] else "latent_from_r.csv"

# ---- an R object: 400 cells x 80 genes, two cell types, two batches -------------------
set.seed(0)
n_genes <- 80L
n_cells <- 400L
cell_type <- rep(c("T", "B"), each = n_cells / 2)
batch <- rep(c("run1", "run2"), times = n_cells / 2)
base <- rgamma(n_genes, shape = 2, rate = 1)
profile_b <- base
profile_b[1:15] <- profile_b[1:15] * 6          # B-cell markers
rates <- sapply(seq_len(n_cells), function(j) {
  p <- if (cell_type[j] == "B") profile_b else base
  p * ifelse(batch[j] == "run2", 1.3, 1)
})
counts <- Matrix(rpois(length(rates), rates), nrow = n_genes, sparse = TRUE)
counts <- as(counts, "CsparseMatrix")            # dgCMatrix, genes x cells
rownames(counts) <- paste0("gene", seq_len(n_genes))
colnames(counts) <- paste0("cell", seq_len(n_cells))
meta <- data.frame(cell_type = cell_type, batch = batch, row.names = colnames(counts))

# ---- to Python: a genes x cells CSC is exactly a cells x genes CSR ----------------------
cellvi <- import("cellvi")
anndata <- import("anndata", convert = FALSE)
sp <- import("scipy.sparse", convert = FALSE)
np <- import("numpy", convert = FALSE)
x <- sp$csr_matrix(
  tuple(np$asarray(counts@x, dtype = "float32"), np$asarray(counts@i), np$asarray(counts@p)),
  shape = tuple(ncol(counts), nrow(counts))
)
adata <- anndata$AnnData(X = x, obs = r_to_py(meta))
adata$var_names <- rownames(counts)

# ---- train and bring the latent space back ---------------------------------------------
cellvi$settings$progress_bar_style <- "none"
cellvi$model$SCVI$setup_anndata(adata, batch_key = "batch")
model <- cellvi$model$SCVI(adata, n_latent = 5L)
model$train(max_epochs = 40L, plan_kwargs = list(n_epochs_kl_warmup = 10L))
z <- model$get_latent_representation()           # numpy array, cells x 5
# go through a plain list, which works whatever numpy/reticulate versions are installed
shape <- unlist(z$shape)
latent <- matrix(unlist(z$ravel()$tolist()), nrow = shape[1], byrow = TRUE)
rownames(latent) <- colnames(counts)

write.csv(data.frame(latent, cell_type = meta$cell_type, batch = meta$batch), out_csv)
cat(sprintf("latent space: %d cells x %d dimensions written to %s\n",
            nrow(latent), ncol(latent), out_csv))
