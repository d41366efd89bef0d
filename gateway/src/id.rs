//! Random ids for connections and nodes.

use rand::Rng;
use rand::distr::Alphanumeric;

/// `len` random alphanumeric characters (a valid id under the token rule).
pub(crate) fn random_id(len: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}
