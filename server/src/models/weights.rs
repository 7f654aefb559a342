//! Safetensors weights of one diffusers component folder (single file or sharded with an index).
//!
//! Files are memory-mapped; a tensor is copied once out of the map when it is requested, cast to
//! the run dtype and moved to the run device, so a large shard is never held twice in memory.
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use tch::{Device, Kind, Tensor};

use super::error::{ModelError, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// All tensors of one component, addressed by their diffusers / transformers names.
pub struct Weights {
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
    device: Device,
    kind: Kind,
}

impl Weights {
    /// Opens the safetensors of a component folder: a `*.safetensors.index.json` (sharded) if
    /// present, else the single `*.safetensors` file in it.
    pub fn from_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let files = if let Some(index) = names
            .iter()
            .find(|n| n.ends_with(".safetensors.index.json"))
        {
            shard_files_from_index(&dir.join(index))?
        } else {
            let singles: Vec<&String> = names
                .iter()
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            match singles.as_slice() {
                [one] => vec![dir.join(one)],
                [] => {
                    return Err(ModelError::Io {
                        path: dir.to_path_buf(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "no .safetensors file (or .safetensors.index.json) in this folder",
                        ),
                    })
                }
                many => {
                    return Err(ModelError::Io {
                        path: dir.to_path_buf(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "{} .safetensors files and no index to say which to use",
                                many.len()
                            ),
                        ),
                    })
                }
            }
        };
        Self::from_files(&files, device, kind)
    }

    pub fn from_files(files: &[PathBuf], device: Device, kind: Kind) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let io_err = |source| ModelError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(path).map_err(io_err)?;
            // SAFETY: the map is read-only; model files are not expected to change while loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::TensorData {
                    path: path.clone(),
                    name: "<header>".into(),
                    message: e.to_string(),
                })?;
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                metadata,
            });
        }
        Ok(Self {
            shards,
            index,
            device,
            kind,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The folder (first shard's path) for error messages.
    pub fn path(&self) -> &Path {
        self.shards
            .first()
            .map(|s| s.path.as_path())
            .unwrap_or(Path::new(""))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor `name`, checked against `shape`, in the run dtype on the run device.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_as(name, shape, self.kind)
    }

    /// Like [`Weights::get`] but in an explicit dtype (for parameters kept in f32).
    pub fn get_as(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let (shard, info) = self.info(name)?;
        let actual: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if actual != shape {
            return Err(ModelError::TensorShape {
                path: shard.path.clone(),
                name: name.to_owned(),
                actual,
                expected: shape.to_vec(),
            });
        }
        self.load(shard, name, info, &actual, kind)
    }

    pub fn shape(&self, name: &str) -> Result<Vec<i64>> {
        let (_, info) = self.info(name)?;
        Ok(info.shape.iter().map(|&d| d as i64).collect())
    }

    fn info(&self, name: &str) -> Result<(&Shard, &safetensors::tensor::TensorInfo)> {
        let missing = || ModelError::MissingTensor {
            path: self.path().to_path_buf(),
            name: name.to_owned(),
        };
        let shard = &self.shards[*self.index.get(name).ok_or_else(missing)?];
        let info = shard.metadata.info(name).ok_or_else(missing)?;
        Ok((shard, info))
    }

    fn load(
        &self,
        shard: &Shard,
        name: &str,
        info: &safetensors::tensor::TensorInfo,
        shape: &[i64],
        kind: Kind,
    ) -> Result<Tensor> {
        let data_err = |message: String| ModelError::TensorData {
            path: shard.path.clone(),
            name: name.to_owned(),
            message,
        };
        let disk_kind = match info.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            other => return Err(data_err(format!("unsupported dtype {other:?}"))),
        };
        let (begin, end) = info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + begin..shard.data_start + end)
            .ok_or_else(|| data_err("data offsets beyond the end of the file".into()))?;
        let tensor = Tensor::f_from_data_size(bytes, shape, disk_kind)
            .map_err(|e| data_err(e.to_string()))?;
        Ok(tensor.to_device(self.device).to_kind(kind))
    }
}

/// The shard files named in a diffusers/transformers `*.safetensors.index.json` weight map.
fn shard_files_from_index(index_path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let index: Index = read_json(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&String> = index.weight_map.values().collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads and parses a JSON file, with errors naming the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(dir: &Path, name: &str, tensors: &[(&str, &Tensor)]) -> PathBuf {
        let path = dir.join(name);
        Tensor::write_safetensors(tensors, &path).unwrap();
        path
    }

    #[test]
    fn loads_casts_and_checks_shapes() {
        let dir = tempdir("weights-single");
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        write_file(&dir, "model.safetensors", &[("a", &a)]);
        let w = Weights::from_dir(&dir, Device::Cpu, Kind::Double).unwrap();
        let got = w.get("a", &[2, 3]).unwrap();
        assert_eq!(got.kind(), Kind::Double);
        assert_eq!(got.to_kind(Kind::Float), a);
        let err = w.get("a", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("[2, 3]"), "{err}");
        let err = w.get("b", &[1]).unwrap_err().to_string();
        assert!(err.contains("missing tensor `b`"), "{err}");
    }

    #[test]
    fn follows_a_shard_index() {
        let dir = tempdir("weights-sharded");
        let a = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([3], (Kind::Half, Device::Cpu));
        write_file(&dir, "m-00001-of-00002.safetensors", &[("a", &a)]);
        write_file(&dir, "m-00002-of-00002.safetensors", &[("b", &b)]);
        std::fs::write(
            dir.join("m.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"a":"m-00001-of-00002.safetensors","b":"m-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let w = Weights::from_dir(&dir, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(w.get("b", &[3]).unwrap().kind(), Kind::Float);
        assert!(w.contains("a"));
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("denoised-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
