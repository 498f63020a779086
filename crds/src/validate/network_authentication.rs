//! The rules of a NetworkAuthentication.

use super::error::FieldError;
use crate::policy::NetworkAuthentication;

/// The rules of the NetworkAuthentication schema: at least one network, every CIDR readable and
/// every exception inside its network.
pub fn validate_network_authentication(n: &NetworkAuthentication) -> Result<(), FieldError> {
    if n.spec.networks.is_empty() {
        return Err(FieldError::new(
            "spec.networks",
            "give at least one network, e.g. {cidr: 10.0.0.0/8}",
        ));
    }
    for (i, net) in n.spec.networks.iter().enumerate() {
        let cidr = mesh_policies::parse_cidr(&net.cidr)
            .map_err(|e| FieldError::new(format!("spec.networks[{i}].cidr"), e))?;
        for (j, except) in net.except.iter().enumerate() {
            let field = format!("spec.networks[{i}].except[{j}]");
            let e = mesh_policies::parse_cidr(except).map_err(|e| FieldError::new(&field, e))?;
            if !cidr.contains(&e) {
                return Err(FieldError::new(field, format!("{e} is not inside {cidr}")));
            }
        }
    }
    Ok(())
}
